//! The release settings of the configuration file, and their refusals, each checked to
//! be one line that points at the value.

use std::path::PathBuf;

use handoff_common::check::CheckSpec;

use super::*;
use crate::config::{NotifySettings, ReleaseSettings};

const PATH: &str = "/etc/handoff/handoffd.toml";

fn parse(text: &str) -> Result<Vec<ServiceConfig>, ConfigFileError> {
    super::parse(text, Path::new(PATH))
}

/// A refusal's message, checked to be one line.
fn refusal(text: &str) -> String {
    let message = parse(text).expect_err("accepted").to_string();
    assert!(!message.contains('\n'), "not one line: {message:?}");
    message
}

/// A `[[service]]` table on lines 1-3, then `extra`.
fn service(extra: &str) -> String {
    format!("[[service]]\nname = \"web\"\nlisten = [\"[::1]:80\"]\n{extra}")
}

#[test]
fn defaults_apply_and_services_override_them() {
    let services = parse(
        r#"
[defaults]
check = "http:/healthz"
check_timeout = "2s"
watch = "60s"

[[service]]
name = "web"
listen = ["0.0.0.0:8080"]

[[service]]
name = "api"
listen = ["0.0.0.0:9000"]
check = "https:/ready:204"
check_timeout = "500ms"
watch = "5m"
notify_socket = "/run/handoff/api.notify"
notify_forward = "/run/systemd/notify"

[[service]]
name = "db"
listen = ["0.0.0.0:5432"]
check = "none"
watch = "off"
"#,
    )
    .expect("a good file");
    let release: Vec<&ReleaseSettings> = services.iter().map(|s| &s.release).collect();
    assert_eq!(
        release[0],
        &ReleaseSettings {
            check: Some(CheckSpec::Http {
                path: "/healthz".into(),
                status: None
            }),
            check_timeout: Duration::from_secs(2),
            watch: Some(Duration::from_secs(60)),
            notify: None,
        }
    );
    assert_eq!(
        release[1],
        &ReleaseSettings {
            check: Some(CheckSpec::Https {
                path: "/ready".into(),
                status: Some(204)
            }),
            check_timeout: Duration::from_millis(500),
            watch: Some(Duration::from_secs(300)),
            notify: Some(NotifySettings {
                socket: "/run/handoff/api.notify".into(),
                forward: Some("/run/systemd/notify".into()),
            }),
        }
    );
    assert_eq!(
        release[2],
        &ReleaseSettings {
            check: None,
            check_timeout: Duration::from_secs(2),
            watch: None,
            notify: None,
        }
    );
}

#[test]
fn release_keys_default_to_off() {
    let services = parse(&service("")).unwrap();
    assert_eq!(services[0].release, ReleaseSettings::default());
    let tcp = parse(&service("check = \"tcp\"\n")).unwrap();
    assert_eq!(tcp[0].release.check, Some(CheckSpec::Tcp));
    let socket = parse(&service("notify_socket = \"/run/handoff/web.notify\"\n")).unwrap();
    assert_eq!(
        socket[0].release.notify,
        Some(NotifySettings {
            socket: PathBuf::from("/run/handoff/web.notify"),
            forward: None,
        })
    );
    let abstract_forward = parse(&service(
        "notify_socket = \"/run/n\"\nnotify_forward = \"@notify\"\n",
    ))
    .unwrap();
    let forward = abstract_forward[0].release.notify.as_ref().unwrap();
    assert_eq!(forward.forward, Some(PathBuf::from("@notify")));
}

#[test]
fn bad_release_values_point_at_the_value() {
    let cases = [
        (
            "[defaults]\n\ncheck = \"http:healthz\"\n".to_string(),
            "3:9: the check's path must start with '/'",
        ),
        (
            service("check = \"udp\"\n"),
            "4:9: unknown check \"udp\"; a check is tcp, http:/PATH",
        ),
        (
            service("check = \"http:/x:99\"\n"),
            "4:9: the check's status \"99\" is not three digits",
        ),
        (
            "[defaults]\ncheck_timeout = \"2h\"\n".to_string(),
            "2:17: \"2h\" is not a check timeout: give a duration from 1ms to 1h (e.g. 500ms, 5s, 1m)",
        ),
        (
            service("check_timeout = \"none\"\n"),
            "4:17: \"none\" is not a check timeout",
        ),
        (
            service("watch = \"25h\"\n"),
            "4:9: \"25h\" is not a watch window: give a duration from 1ms to 24h (e.g. 30s, 5m), or none",
        ),
        (
            "[defaults]\nwatch = \"0s\"\n".to_string(),
            "2:9: \"0s\" is not a watch window",
        ),
        (
            service("notify_socket = \"web.notify\"\n"),
            "4:17: \"web.notify\" is not a notify socket's path: give an absolute path (e.g. /run/handoff/web.notify)",
        ),
        (
            service(&format!("notify_socket = \"/{}\"\n", "n".repeat(107))),
            "4:17: \"/nnn",
        ),
        (
            service("notify_socket = \"/run/n\"\nnotify_forward = \"systemd\"\n"),
            "5:18: \"systemd\" is not a notify socket to forward to: give an absolute path or @NAME",
        ),
        (
            service("notify_forward = \"/run/systemd/notify\"\n"),
            "4:18: a notify forward needs the service's notify socket",
        ),
        (
            service("notify_forward = \"/run/n\"\nnotify_socket = \"/run/n\"\n"),
            "4:18: the notify forward \"/run/n\" is the service's notify socket itself",
        ),
    ];
    for (text, want) in cases {
        let message = refusal(&text);
        assert!(
            message.starts_with(&format!("{PATH}:{want}")),
            "{message}\nwanted {PATH}:{want}"
        );
    }
    let long = refusal(&service(&format!(
        "notify_socket = \"/{}\"\n",
        "n".repeat(107)
    )));
    assert!(long.ends_with("longer than 107 bytes, the most a unix socket's path can be"));
}

#[test]
fn notify_keys_belong_to_a_service() {
    for key in ["notify_socket", "notify_forward"] {
        let message = refusal(&format!("[defaults]\n{key} = \"/run/n\"\n"));
        assert!(
            message.starts_with(&format!("{PATH}:2:1: unknown field `{key}`")),
            "{message}"
        );
    }
}

#[test]
fn two_services_cannot_share_a_notify_socket() {
    let text = "[[service]]\nname = \"a\"\nlisten = [\"[::1]:80\"]\nnotify_socket = \"/run/n\"\n\
                [[service]]\nname = \"b\"\nlisten = [\"[::1]:81\"]\nnotify_socket = \"/run//n\"\n";
    assert_eq!(
        refusal(text),
        format!("{PATH}:8:17: service b: /run//n is already service a's notify socket (line 4)")
    );
}

#[test]
fn the_shipped_examples_settings_are_valid() {
    // Every commented setting of the shipped file's [defaults] and first [[service]],
    // uncommented: the examples it gives parse as documented.
    let text = include_str!("../../../../dist/handoffd.toml");
    let until_second = text.split("\n#[[service]]").next().unwrap();
    let uncommented: String = until_second
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(kv) if kv.starts_with(|c: char| c.is_ascii_lowercase()) && kv.contains(" = ") => {
                kv
            }
            _ => l,
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let services = parse(&uncommented).expect("dist/handoffd.toml, uncommented");
    let release = &services[0].release;
    assert_eq!(release.check, Some(CheckSpec::Tcp));
    assert_eq!(release.watch, Some(Duration::from_secs(60)));
    let notify = release.notify.as_ref().expect("its notify socket");
    assert_eq!(notify.forward, Some(PathBuf::from("/run/systemd/notify")));
}
