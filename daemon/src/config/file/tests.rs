//! The configuration file's parsing and refusals, each checked to be one line.

use super::*;

const PATH: &str = "/etc/handoff/handoffd.toml";

fn parse(text: &str) -> Result<Vec<ServiceConfig>, ConfigFileError> {
    super::parse(text, Path::new(PATH))
}

/// The message of a refusal, checked to be one line.
fn refusal(text: &str) -> (ConfigFileError, String) {
    let err = parse(text).expect_err("accepted");
    let message = err.to_string();
    assert!(!message.contains('\n'), "not one line: {message:?}");
    (err, message)
}

/// The line of a refusal, checked against the `FILE:LINE:` prefix of its message.
fn line_of(text: &str) -> (usize, String) {
    let (_, message) = refusal(text);
    let rest = message
        .strip_prefix(&format!("{PATH}:"))
        .unwrap_or_else(|| panic!("no file prefix: {message}"));
    let line = rest.split(':').next().unwrap().parse().expect("a line");
    (line, message)
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn two_services_with_defaults() {
    let services = parse(
        r#"
# comment
[defaults]
drain_signal = "SIGQUIT"
drain_timeout = "90s"
kill_after = "30s"

[[service]]
name = "web"
listen = ["0.0.0.0:8080", "[::]:8080"]

[[service]]
name = "api_2"
listen = ["127.0.0.1:9000"]
drain_signal = "none"
retire_signal = "USR2"
drain_timeout = "500ms"
kill_after = "off"
"#,
    )
    .expect("a good file");
    assert_eq!(
        services,
        vec![
            ServiceConfig {
                name: "web".into(),
                listen: addrs(&["0.0.0.0:8080", "[::]:8080"]),
                drain: DrainSettings {
                    drain_signal: Some(Sig(libc::SIGQUIT)),
                    retire_signal: Sig(libc::SIGTERM),
                    drain_timeout: Duration::from_secs(90),
                    kill_after: Some(Duration::from_secs(30)),
                },
                user: None,
                release: crate::config::ReleaseSettings::default(),
            },
            ServiceConfig {
                name: "api_2".into(),
                listen: addrs(&["127.0.0.1:9000"]),
                drain: DrainSettings {
                    drain_signal: None,
                    retire_signal: Sig(libc::SIGUSR2),
                    drain_timeout: Duration::from_millis(500),
                    kill_after: None,
                },
                user: None,
                release: crate::config::ReleaseSettings::default(),
            },
        ]
    );
}

#[test]
fn a_service_may_name_its_user() {
    let base = "[[service]]\nname = \"web\"\nlisten = [\"[::1]:80\"]\n";
    let by_name = parse(&format!("{base}user = \"root\"\n")).unwrap();
    assert_eq!(by_name[0].user, Some(0));
    let by_uid = parse(&format!("{base}user = \"65534\"\n")).unwrap();
    assert_eq!(by_uid[0].user, Some(65534));
    let (line, message) = line_of(&format!("{base}user = \"no-such-user-here\"\n"));
    assert_eq!(line, 4, "{message}");
    assert!(message.contains("no-such-user-here"), "{message}");
}

#[test]
fn built_in_defaults_without_a_defaults_table() {
    let services = parse("[[service]]\nname = \"web\"\nlisten = [\"[::1]:80\"]\n").unwrap();
    assert_eq!(services[0].drain, DrainSettings::default());
}

#[test]
fn load_reads_the_file_or_names_it() {
    let dir = std::env::temp_dir().join(format!("handoff-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("handoffd.toml");
    std::fs::write(
        &file,
        "[[service]]\nname = \"a\"\nlisten = [\"0.0.0.0:1\"]\n",
    )
    .unwrap();
    assert_eq!(load(&file).unwrap()[0].name, "a");
    let missing = dir.join("missing.toml");
    let err = load(&missing).unwrap_err();
    assert!(matches!(err, ConfigFileError::Read { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{}: cannot be read", missing.display())
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_service_is_an_error() {
    for text in ["", "# nothing\n", "[defaults]\nretire_signal = \"TERM\"\n"] {
        let (err, message) = refusal(text);
        assert!(matches!(err, ConfigFileError::NoService { .. }), "{err:?}");
        assert_eq!(message, format!("{PATH}: no [[service]]"));
    }
}

#[test]
fn syntax_errors_point_at_their_line() {
    let (line, message) = line_of("[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"\n");
    assert_eq!(line, 3, "{message}");
    let (line, message) = line_of("[defaults]\ndrain_timeout = 300\n");
    assert_eq!(line, 2, "{message}");
    assert!(message.contains("string"), "{message}");
    // `[service]` for `[[service]]`: a table where a list of tables belongs.
    let (line, message) = line_of("\n[service]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\n");
    assert_eq!(line, 2, "{message}");
    assert!(
        message.ends_with("write [[service]], one table per service"),
        "{message}"
    );
    let (line, message) = line_of("[[service]]\nname = \"a\"\nname = \"b\"\n");
    assert_eq!(line, 3, "{message}");
}

#[test]
fn unknown_keys_are_refused_where_they_are() {
    let (line, message) = line_of("[defaults]\ndrain_timout = \"5s\"\n");
    assert_eq!(line, 2, "{message}");
    assert!(message.contains("drain_timout"), "{message}");
    let (line, message) =
        line_of("[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\nport = 80\n");
    assert_eq!(line, 4, "{message}");
    assert!(message.contains("port"), "{message}");
    let (line, message) =
        line_of("[[service]]\nname = \"a\"\nlisten = [\"0.0.0.0:80\"]\n[extra]\n");
    assert_eq!(line, 4, "{message}");
}

#[test]
fn missing_keys_are_refused() {
    let (_, message) = refusal("[[service]]\nlisten = [\"0.0.0.0:80\"]\n");
    assert!(message.starts_with(&format!("{PATH}:1:")), "{message}");
    assert!(message.contains("name"), "{message}");
}

#[test]
fn bad_signals_and_durations_point_at_the_value() {
    let cases = [
        ("[defaults]\n\nretire_signal = \"SIGNOPE\"\n", 3, "SIGNOPE"),
        (
            "[defaults]\ndrain_timeout = \"0s\"\n",
            2,
            "positive duration",
        ),
        (
            "[defaults]\nkill_after = \"5 minutes\"\n",
            2,
            "positive duration",
        ),
        (
            "[defaults]\n\ndrain_timeout = \"9300000000000000000s\"\n",
            3,
            "longer than 30 days",
        ),
        (
            "[[service]]\nname = \"a\"\nlisten = [\"0.0.0.0:80\"]\ndrain_signal = \"65\"\n",
            4,
            "not a signal",
        ),
    ];
    for (text, want, needle) in cases {
        let (err, message) = refusal(text);
        assert!(matches!(err, ConfigFileError::Invalid { .. }), "{err:?}");
        let (line, _) = line_of(text);
        assert_eq!(line, want, "{message}");
        assert!(message.contains(needle), "{message}");
    }
    let (_, message) = refusal("[defaults]\ndrain_timeout = \"0s\"\n");
    assert_eq!(
        message,
        format!("{PATH}:2:17: \"0s\" is not a positive duration (e.g. 500ms, 90s, 5m, 1h)")
    );
}

#[test]
fn bad_services_point_at_the_value() {
    let service = |name: &str, listen: &str| {
        format!("[[service]]\nname = \"{name}\"\nlisten = [\n  {listen}\n]\n")
    };
    let cases = [
        (service("a/b", "\"0.0.0.0:80\""), 2, "service name"),
        (service("a", "\"0.0.0.0\""), 4, "not an address"),
        (service("a", "\"0.0.0.0:0\""), 4, "port 0"),
        (
            service("a", "\"0.0.0.0:80\",\n  \"[::]:81\""),
            5,
            "different ports",
        ),
        (
            service("a", "\"0.0.0.0:80\", \"[::]:80\",\n  \"0.0.0.0:80\""),
            5,
            "listed twice",
        ),
        (
            "[[service]]\nname = \"a\"\nlisten = []\n".to_string(),
            3,
            "no address",
        ),
    ];
    for (text, want, needle) in cases {
        let (line, message) = line_of(&text);
        assert_eq!(line, want, "{message}");
        assert!(message.contains(needle), "{message}");
    }
}

#[test]
fn duplicate_names_are_refused() {
    let text = "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\n\n\
                    [[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:81\"]\n";
    let (err, message) = refusal(text);
    assert!(
        matches!(&err, ConfigFileError::DuplicateName { first_line: 2, .. }),
        "{err:?}"
    );
    assert_eq!(
        message,
        format!("{PATH}:6:8: service web is already defined on line 2")
    );
}

#[test]
fn duplicate_ports_are_refused() {
    let text = "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\n\n\
                    [[service]]\nname = \"api\"\nlisten = [\"127.0.0.1:80\"]\n";
    let (err, message) = refusal(text);
    assert!(
        matches!(
            &err,
            ConfigFileError::DuplicatePort {
                port: 80,
                other_line: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        message,
        format!(
            "{PATH}:7:11: service api: port 80 is already service web's (line 3); two services cannot steer one port"
        )
    );
}

#[test]
fn columns_count_characters() {
    let src = Source {
        text: "é = 1\n  x",
        path: Path::new("f"),
    };
    assert_eq!(src.at(9).to_string(), "f:2:3");
    assert_eq!(src.at(2).to_string(), "f:1:2");
    assert_eq!(src.at(99).to_string(), "f:2:4");
}

#[test]
fn the_shipped_example_is_valid() {
    let text = include_str!("../../../../dist/handoffd.toml");
    let services = parse(text).expect("dist/handoffd.toml");
    assert!(!services.is_empty());
}
