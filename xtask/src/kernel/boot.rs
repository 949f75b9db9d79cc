//! The kernels under test, their files in the unpacked packages, and the decompressed
//! `vmlinux` (booting it instead of the bzImage halves the boot under emulation).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::fetch::Pin;

/// What a kernel is expected to do with handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// handoffd runs: the smoke handoff and the integration tests pass.
    Run,
    /// handoffd refuses to start with one line naming the missing features.
    Refusal,
}

/// A kernel under test.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// The name on the command line (`--kernel 6.1`).
    pub name: &'static str,
    /// Its Debian package.
    pub pin: Pin,
    /// What handoff does on it.
    pub expect: Expect,
}

/// The kernels, in the default order. Pins taken on 2026-12-01.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "6.1",
        pin: Pin {
            package: "linux-image-6.1.0-57-amd64-unsigned",
            version: "6.1.192-3",
            sha256: "f43a8dbe0b318a5491880233bb20982dc9cc8ef103dd361cd56499eea15c5191",
        },
        expect: Expect::Run,
    },
    Kernel {
        name: "6.12",
        pin: Pin {
            package: "linux-image-6.12.117+deb12-amd64-unsigned",
            version: "6.12.117-1~deb12u1",
            sha256: "5de3e329c887173debec07ff1325c975cf4f286d364929d17fecb1e1325c5c46",
        },
        expect: Expect::Run,
    },
    Kernel {
        name: "5.10",
        pin: Pin {
            package: "linux-image-5.10.0-46-amd64-unsigned",
            version: "5.10.262-1",
            sha256: "c0e850b617fa3afedb2165b1a42cda53a487a9c6e9a13f00777f9296b7c3b06b",
        },
        expect: Expect::Refusal,
    },
];

/// The kernel modules the tests need, in load order (a module after its dependencies:
/// tcp_diag and udp_diag need inet_diag). `udp_diag` is loaded when the package has it.
pub const MODULES: [(&str, &str, bool); 6] = [
    ("net/ipv4", "inet_diag", true),
    ("net/ipv4", "tcp_diag", true),
    ("net/ipv4", "udp_diag", false),
    ("net/sched", "sch_ingress", true),
    ("net/sched", "cls_bpf", true),
    ("drivers/net", "veth", true),
];

/// A kernel's files, found in its unpacked package.
pub struct KernelFiles {
    /// `uname -r`.
    pub release: String,
    /// What qemu boots: the decompressed vmlinux, or the bzImage if that failed.
    pub image: PathBuf,
    /// The needed modules (name, uncompressed `.ko` bytes), in load order.
    pub modules: Vec<(String, Vec<u8>)>,
}

/// Finds the kernel image and modules of the unpacked package `dir`.
pub fn kernel_files(dir: &Path) -> Result<KernelFiles> {
    let modules_dir = dir.join("lib/modules");
    let release = std::fs::read_dir(&modules_dir)
        .with_context(|| format!("no {} in the kernel package", modules_dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("no kernel release under {}", modules_dir.display()))?;
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("the kernel package has no {}", vmlinuz.display());
    }
    let image = vmlinux(dir, &vmlinuz).unwrap_or_else(|e| {
        eprintln!(
            "kernel-test: booting the compressed {} ({e:#})",
            vmlinuz.display()
        );
        vmlinuz.clone()
    });
    let kernel = modules_dir.join(&release).join("kernel");
    let mut modules = Vec::new();
    for (sub, name, required) in MODULES {
        let plain = kernel.join(sub).join(format!("{name}.ko"));
        let xz = kernel.join(sub).join(format!("{name}.ko.xz"));
        let bytes = if plain.is_file() {
            std::fs::read(&plain).with_context(|| format!("cannot read {}", plain.display()))?
        } else if xz.is_file() {
            let out = Command::new("xz")
                .arg("-dc")
                .arg(&xz)
                .output()
                .context("cannot run xz (apt-get install -y xz-utils)")?;
            if !out.status.success() {
                bail!("xz -dc {} failed", xz.display());
            }
            out.stdout
        } else if required {
            bail!(
                "the kernel package has no {name}.ko under {}",
                kernel.display()
            );
        } else {
            continue;
        };
        check_depends(name, &bytes, &modules)?;
        modules.push((name.to_owned(), bytes));
    }
    Ok(KernelFiles {
        release,
        image,
        modules,
    })
}

/// Fails unless every module that `name` depends on (its `.modinfo` `depends=`) is loaded
/// before it: there is no depmod in the guest.
fn check_depends(name: &str, ko: &[u8], before: &[(String, Vec<u8>)]) -> Result<()> {
    let key = b"depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Ok(());
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let depends = String::from_utf8_lossy(&rest[..end]);
    for dep in depends.split(',').filter(|d| !d.is_empty()) {
        if !before.iter().any(|(n, _)| n == dep) {
            bail!("module {name} depends on {dep}, which the guest does not load before it");
        }
    }
    Ok(())
}

/// The decompressed kernel next to the package's files (made once, then cached): the
/// payload of the bzImage starts at the magic of its compressor (as the kernel's
/// scripts/extract-vmlinux finds it).
fn vmlinux(dir: &Path, vmlinuz: &Path) -> Result<PathBuf> {
    let out_path = dir.join("vmlinux");
    if out_path.is_file() {
        return Ok(out_path);
    }
    let data = std::fs::read(vmlinuz)?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc", "-q"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc", "-q"]),
    ];
    for (magic, tool, args) in formats {
        let Some(at) = data.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let Ok(elf) = decompress(tool, args, &data[at..]) else {
            continue;
        };
        // The decompressor may complain about the bytes after its stream; what counts is
        // an ELF image.
        if elf.len() > 1 << 20 && elf.starts_with(b"\x7fELF") {
            let tmp = out_path.with_extension("partial");
            std::fs::write(&tmp, &elf)?;
            std::fs::rename(&tmp, &out_path)?;
            return Ok(out_path);
        }
    }
    bail!("found no compressed kernel in it that xz, zstd or gzip could unpack")
}

/// `tool ARGS` on `input`; its stdout, whatever its exit status.
fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {tool}"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A decompressor that stops at the end of its stream closes the pipe early.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out.stdout)
}
