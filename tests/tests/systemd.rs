//! The shipped systemd unit is valid, as `systemd-analyze verify` sees it.

use std::process::Command;

use handoff_tests::bin_path;

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = include_str!("../../dist/handoffd.service");
    assert!(
        unit.contains("Type=notify"),
        "the daemon tells systemd when it is ready"
    );
    // verify checks that ExecStart= and ExecReload= are executable: point them at the
    // built binaries.
    let unit = unit
        .replace(
            "/usr/bin/handoffd",
            &bin_path("handoffd").display().to_string(),
        )
        .replace(
            "/usr/bin/handoffctl",
            &bin_path("handoffctl").display().to_string(),
        );
    let dir = std::env::temp_dir().join(format!("handoff-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("handoffd.service");
    std::fs::write(&path, unit).expect("writing the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("systemd-analyze (apt-get install -y systemd) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
