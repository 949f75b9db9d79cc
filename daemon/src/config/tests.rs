//! Services, signals, durations, users and flags, checked.

use super::*;

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn service(name: &str, listen: &[SocketAddr]) -> Result<ServiceConfig, ConfigError> {
    super::service(name, listen, DrainSettings::default())
}

#[test]
fn signals_by_name_or_number() {
    assert_eq!("SIGQUIT".parse(), Ok(Sig(libc::SIGQUIT)));
    assert_eq!("term".parse(), Ok(Sig(libc::SIGTERM)));
    assert_eq!("USR2".parse(), Ok(Sig(libc::SIGUSR2)));
    assert_eq!("34".parse(), Ok(Sig(34)));
    for bad in ["SIGNOPE", "0", "65", "-1", ""] {
        assert!(bad.parse::<Sig>().is_err(), "{bad:?} accepted");
    }
    assert_eq!(Sig(libc::SIGQUIT).to_string(), "SIGQUIT");
}

#[test]
fn durations_need_a_positive_value() {
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    for bad in ["0", "0s", "-5s", "5x", "s", "", "1e400s", "1.2.3s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(parse_duration("720h"), Ok(MAX_DURATION));
    for long in [
        "9300000000000000000s",
        "18446744073709551616s",
        "720.001h",
        "2592000001ms",
        &"9".repeat(400),
    ] {
        assert_eq!(
            parse_duration(long),
            Err(ConfigError::DurationTooLong(long.to_string())),
            "{long:?}"
        );
    }
}

#[test]
fn a_service_has_one_port_and_distinct_addresses() {
    assert!(service("web", &addrs(&["127.0.0.1:80", "[::1]:80"])).is_ok());
    assert!(matches!(
        service("web", &addrs(&["127.0.0.1:80", "[::1]:81"])),
        Err(ConfigError::Ports { .. })
    ));
    assert!(matches!(
        service("web", &addrs(&["127.0.0.1:80", "127.0.0.1:80"])),
        Err(ConfigError::Duplicate { .. })
    ));
    assert!(matches!(
        service("web", &addrs(&["127.0.0.1:0"])),
        Err(ConfigError::PortZero { .. })
    ));
    assert_eq!(
        service("web", &[]),
        Err(ConfigError::NoListen("web".into()))
    );
    let many: Vec<SocketAddr> = (0..=MAX_LISTEN as u8)
        .map(|i| SocketAddr::from(([127, 0, 0, i], 80)))
        .collect();
    assert!(matches!(
        service("web", &many),
        Err(ConfigError::TooManyAddresses { count: 65, .. })
    ));
}

#[test]
fn flags_make_or_override_a_single_service() {
    let listen = addrs(&["127.0.0.1:80"]);
    let flags = Overrides {
        listen: listen.clone(),
        retire_signal: Some(Sig(libc::SIGQUIT)),
        ..Default::default()
    };
    let made = flags.apply(None).unwrap();
    assert_eq!(made[0].name, "default");
    assert_eq!(made[0].drain.retire_signal, Sig(libc::SIGQUIT));
    assert_eq!(made[0].drain.drain_timeout, Duration::from_secs(300));

    let file =
        vec![super::service("web", &addrs(&["[::1]:81"]), DrainSettings::default()).unwrap()];
    let over = Overrides {
        drain_timeout: Some(Duration::from_secs(9)),
        ..Default::default()
    };
    let got = over.apply(Some(file.clone())).unwrap();
    assert_eq!(
        (got[0].name.as_str(), got[0].drain.drain_timeout),
        ("web", Duration::from_secs(9))
    );
    assert_eq!(got[0].listen, file[0].listen);
    assert_eq!(
        Overrides::default().apply(Some(file.clone())).unwrap(),
        file
    );
    let two = vec![
        file[0].clone(),
        super::service("b", &addrs(&["[::1]:82"]), DrainSettings::default()).unwrap(),
    ];
    assert_eq!(over.apply(Some(two)), Err(ConfigError::Overrides(2)));
}

#[test]
fn users_are_names_or_uids() {
    assert_eq!(resolve_user("root"), Ok(0));
    assert_eq!(resolve_user("65534"), Ok(65534));
    for bad in ["", "no-such-user-here", "4294967295", "99999999999", "-1"] {
        assert!(resolve_user(bad).is_err(), "{bad:?} accepted");
    }
    let flags = Overrides {
        listen: addrs(&["127.0.0.1:80"]),
        user: Some(33),
        ..Default::default()
    };
    assert_eq!(flags.apply(None).unwrap()[0].user, Some(33));
}

#[test]
fn names_are_path_safe() {
    assert!(check_name("web-1_a").is_ok());
    for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
        assert!(check_name(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn control_socket_defaults_into_the_state_dir() {
    let p = Paths::new("/run/x".into(), None);
    assert_eq!(p.control_socket, PathBuf::from("/run/x/handoffd.sock"));
    assert_eq!(p.lock_file(), PathBuf::from("/run/x/handoffd.lock"));
}

#[test]
fn release_values_are_checked() {
    assert_eq!(parse_check("tcp"), Ok(OrOff(Some(CheckSpec::Tcp))));
    assert_eq!(parse_check("none"), Ok(OrOff(None)));
    assert_eq!(parse_check("off"), Ok(OrOff(None)));
    let e = parse_check("http:healthz").unwrap_err();
    assert!(matches!(e, ConfigError::Check(_)), "{e:?}");
    assert!(e.to_string().contains("must start with '/'"), "{e}");

    assert_eq!(parse_check_timeout("1ms"), Ok(MIN_RELEASE_DURATION));
    assert_eq!(parse_check_timeout("1h"), Ok(MAX_CHECK_TIMEOUT));
    for bad in ["0.5ms", "3601s", "61m", "none", "0", "5x", "720h"] {
        assert_eq!(
            parse_check_timeout(bad),
            Err(ConfigError::CheckTimeout(bad.into())),
            "{bad:?}"
        );
    }
    assert_eq!(parse_watch("24h"), Ok(OrOff(Some(MAX_WATCH))));
    assert_eq!(parse_watch("off"), Ok(OrOff(None)));
    for bad in ["0.1ms", "1441m", "0", "soon", "30d"] {
        assert_eq!(
            parse_watch(bad),
            Err(ConfigError::Watch(bad.into())),
            "{bad:?}"
        );
    }
}

#[test]
fn notify_paths_are_socket_paths() {
    assert_eq!(
        parse_notify_socket("/run/handoff/web.notify"),
        Ok(PathBuf::from("/run/handoff/web.notify"))
    );
    let longest = format!("/{}", "n".repeat(MAX_SOCKET_PATH - 1));
    assert!(parse_notify_socket(&longest).is_ok());
    for bad in [
        "web.notify",
        "",
        "/run/handoff/",
        "/a\0b",
        &format!("{longest}n"),
        "@x",
    ] {
        let e = parse_notify_socket(bad).expect_err(bad);
        assert!(
            matches!(e, ConfigError::NotifySocket { .. }),
            "{bad:?}: {e:?}"
        );
    }
    assert_eq!(
        parse_notify_forward("/run/systemd/notify"),
        Ok(PathBuf::from("/run/systemd/notify"))
    );
    assert_eq!(
        parse_notify_forward("@systemd-notify"),
        Ok(PathBuf::from("@systemd-notify"))
    );
    let long_name = format!("@{}", "n".repeat(MAX_SOCKET_PATH + 1));
    for bad in ["run/systemd/notify", "@", &long_name, "/run/", "@a\0b"] {
        let e = parse_notify_forward(bad).expect_err(bad);
        assert!(
            matches!(e, ConfigError::NotifyForward { .. }),
            "{bad:?}: {e:?}"
        );
    }
    assert_eq!(notify_settings(None, None), Ok(None));
    assert_eq!(
        notify_settings(None, Some("/run/systemd/notify".into())),
        Err(ConfigError::ForwardAlone)
    );
    assert_eq!(
        notify_settings(Some("/run/n".into()), Some("/run//n/.".into())),
        Err(ConfigError::ForwardLoop("/run//n/.".into()))
    );
}

#[test]
fn release_flags_make_or_override_a_single_service() {
    let mut file =
        vec![super::service("web", &addrs(&["[::1]:81"]), DrainSettings::default()).unwrap()];
    file[0].release = ReleaseSettings {
        check: Some(CheckSpec::Tcp),
        check_timeout: Duration::from_secs(2),
        watch: Some(Duration::from_secs(60)),
        notify: Some(NotifySettings {
            socket: "/run/handoff/web.notify".into(),
            forward: Some("/run/systemd/notify".into()),
        }),
    };
    // Off, and a new forward beside the file's socket.
    let flags = Overrides {
        check: Some(OrOff(None)),
        watch: Some(OrOff(None)),
        notify_forward: Some("@other".into()),
        ..Default::default()
    };
    let got = flags.apply(Some(file.clone())).unwrap();
    let release = &got[0].release;
    assert_eq!((&release.check, release.watch), (&None, None));
    assert_eq!(release.check_timeout, Duration::from_secs(2));
    assert_eq!(
        release.notify,
        Some(NotifySettings {
            socket: "/run/handoff/web.notify".into(),
            forward: Some("@other".into()),
        })
    );
    // Without a file: the flags over the built-in defaults.
    let https: CheckSpec = "https:/ready:204".parse().unwrap();
    let flags = Overrides {
        listen: addrs(&["127.0.0.1:80"]),
        check: Some(OrOff(Some(https.clone()))),
        check_timeout: Some(Duration::from_millis(800)),
        watch: Some(OrOff(Some(Duration::from_secs(30)))),
        notify_socket: Some("/run/n".into()),
        ..Default::default()
    };
    let release = flags.apply(None).unwrap().remove(0).release;
    assert_eq!(release.check, Some(https));
    assert_eq!(release.check_timeout, Duration::from_millis(800));
    assert_eq!(release.watch, Some(Duration::from_secs(30)));
    assert_eq!(
        release.notify.map(|n| (n.socket, n.forward)),
        Some(("/run/n".into(), None))
    );
    let alone = Overrides {
        listen: addrs(&["127.0.0.1:80"]),
        notify_forward: Some("/run/systemd/notify".into()),
        ..Default::default()
    };
    assert_eq!(alone.apply(None), Err(ConfigError::ForwardAlone));
    file[0].release.notify = None;
    let forward_only = Overrides {
        notify_forward: Some("/run/systemd/notify".into()),
        ..Default::default()
    };
    assert_eq!(
        forward_only.apply(Some(file)),
        Err(ConfigError::ForwardAlone)
    );
}
