//! The guest's initramfs: busybox (init, shell, tools), the static workspace binaries and
//! test executables, the kernel's modules, and the host's `ip`, `tc`, `ss`, `prlimit`,
//! `setpriv`, nginx and python3 with the libraries `ldd` names for them.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::cpio;

/// Host programs the guest needs, with the Debian package that provides each.
const HOST_PROGRAMS: [(&str, &str); 8] = [
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/sbin/tc", "iproute2"),
    ("/usr/bin/ss", "iproute2"),
    ("/usr/bin/prlimit", "util-linux"),
    ("/usr/bin/setpriv", "util-linux"),
    // busybox's lack --cgroup and --kill-child (the host test's).
    ("/usr/bin/unshare", "util-linux"),
    ("/usr/bin/nsenter", "util-linux"),
    ("/usr/sbin/nginx", "nginx-light"),
];

/// `/bin/sh` of the guest (tests run `sh -c` scripts that must find the host's tools).
const DASH: &str = "/usr/bin/dash";

/// The Python interpreter (`fd_budget` runs a forking Python script).
const PYTHON: &str = "/usr/bin/python3";

/// The modules that `fd_budget`'s script imports: the guest gets these and whatever
/// Python loads at start, as the host's interpreter reports them.
const PYTHON_IMPORTS: &str = "os, signal, socket, sys, time";

/// One file in the image.
enum Entry {
    Dir(u32),
    /// Permission bits and the host file to copy.
    File(u32, PathBuf),
    /// Permission bits and the content.
    Bytes(u32, Vec<u8>),
    Symlink(String),
    /// Permission bits, major, minor.
    CharDev(u32, u32, u32),
}

/// The image's files by absolute path; parents sort before their children.
#[derive(Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    /// An image with the base layout: root mode 0755 (tests drop to uid 65534 and must
    /// still reach /tmp), /dev/console, mount points, users root and nobody.
    pub fn base() -> Self {
        let mut tree = Self::default();
        for (dir, mode) in [
            ("/", 0o755),
            ("/dev", 0o755),
            ("/proc", 0o555),
            ("/sys", 0o555),
            ("/tmp", 0o1777),
            ("/run", 0o755),
            ("/root", 0o700),
            ("/var/lib/nginx", 0o755),
            ("/var/log/nginx", 0o755),
            ("/var/lock", 0o755),
            ("/lib/modules", 0o755),
            ("/t/deps", 0o755),
        ] {
            tree.dir(dir, mode);
        }
        tree.insert("/dev/console", Entry::CharDev(0o600, 5, 1));
        tree.bytes(
            "/etc/passwd",
            0o644,
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        );
        // nginx started as root runs its workers as nobody:nogroup (Debian's build).
        tree.bytes("/etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n");
        tree.bytes("/etc/hosts", 0o644, "127.0.0.1 localhost\n::1 localhost\n");
        tree.bytes(
            "/etc/nsswitch.conf",
            0o644,
            "passwd: files\ngroup: files\nhosts: files\n",
        );
        // busybox init: run the guest script once, and reap orphans meanwhile (a retired
        // generation's pid really goes away).
        tree.bytes(
            "/etc/inittab",
            0o644,
            "::sysinit:/bin/busybox sh /t/guest.sh\n",
        );
        tree
    }

    /// Adds the static busybox at /bin/busybox, `/init`, and a link in /bin for each of
    /// its applets (host programs in /usr come first in the guest's PATH).
    pub fn busybox(&mut self, busybox: &Path) -> Result<()> {
        let out = Command::new(busybox)
            .arg("--list")
            .output()
            .with_context(|| format!("cannot run {} --list", busybox.display()))?;
        if !out.status.success() {
            bail!("{} --list failed", busybox.display());
        }
        self.file("/bin/busybox", 0o755, busybox);
        for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            // Debian's busybox-static runs its own applets before PATH in `sh` (its
            // setpriv lacks --reuid): the tests' `sh -c` is the host's dash instead.
            if applet != "busybox" && applet != "sh" && !applet.contains('/') {
                self.insert(
                    &format!("/bin/{applet}"),
                    Entry::Symlink("busybox".to_owned()),
                );
            }
        }
        self.insert("/init", Entry::Symlink("/bin/busybox".to_owned()));
        self.insert("/sbin/init", Entry::Symlink("/bin/busybox".to_owned()));
        Ok(())
    }

    /// Adds the host's programs (and Python if `python`), with their libraries; fails
    /// naming the package to install when one is missing.
    pub fn host_programs(&mut self, python: bool) -> Result<()> {
        let python_pkg = [(PYTHON, "python3-minimal")];
        let wanted = HOST_PROGRAMS
            .iter()
            .chain(python_pkg.iter().filter(|_| python));
        for &(path, package) in wanted {
            if !Path::new(path).is_file() {
                bail!("the guest needs the host's {path}: apt-get install -y {package}");
            }
            self.dynamic(Path::new(path))?;
        }
        if !Path::new(DASH).is_file() {
            bail!("the guest needs the host's {DASH}: apt-get install -y dash");
        }
        self.dynamic(Path::new(DASH))?;
        self.insert("/bin/sh", Entry::Symlink(DASH.to_owned()));
        if python {
            self.python()?;
        }
        Ok(())
    }

    /// Adds `path` (its content, under its own name) and every library `ldd` names.
    fn dynamic(&mut self, path: &Path) -> Result<()> {
        let name = path.to_string_lossy().into_owned();
        if self.entries.contains_key(&name) {
            return Ok(());
        }
        let real = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        self.file(&name, 0o755, &real);
        let out = Command::new("ldd")
            .arg(path)
            .output()
            .context("cannot run ldd (from libc-bin)")?;
        // A static program: "not a dynamic executable", exit status 1.
        if !out.status.success() {
            return Ok(());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", or the loader
            // "/lib64/ld-linux-x86-64.so.2 (0x…)", or "linux-vdso.so.1 (0x…)".
            let lib = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|l| l.starts_with('/')),
            };
            let Some(lib) = lib.filter(|l| l.starts_with('/')) else {
                if line.contains("not found") {
                    bail!("{}: {}", path.display(), line.trim());
                }
                continue;
            };
            if !self.entries.contains_key(lib) {
                let real = Path::new(lib)
                    .canonicalize()
                    .with_context(|| format!("cannot resolve {lib}"))?;
                self.file(lib, 0o755, &real);
            }
        }
        Ok(())
    }

    /// The parts of the host's Python standard library that start-up and
    /// [`PYTHON_IMPORTS`] load (sources, compiled files, extension modules).
    fn python(&mut self) -> Result<()> {
        let code = format!(
            "import {PYTHON_IMPORTS}\n\
             for m in list(sys.modules.values()):\n\
             \x20   for a in ('__file__', '__cached__'):\n\
             \x20       f = getattr(m, a, None)\n\
             \x20       if f: print(f)\n\
             import sysconfig\n\
             print('landmark', sysconfig.get_paths()['stdlib'])\n"
        );
        let out = Command::new(PYTHON)
            .args(["-c", &code])
            .output()
            .with_context(|| format!("cannot run {PYTHON}"))?;
        if !out.status.success() {
            bail!(
                "{PYTHON} failed listing its modules: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(stdlib) = line.strip_prefix("landmark ") {
                // getpath finds the prefix by os.py and lib-dynload.
                let os = format!("{stdlib}/os.py");
                self.file(&os, 0o644, Path::new(&os));
                self.dir(&format!("{stdlib}/lib-dynload"), 0o755);
                continue;
            }
            let path = Path::new(line);
            if !path.is_file() {
                continue;
            }
            if line.ends_with(".so") {
                self.dynamic(path)?;
            } else {
                self.file(line, 0o644, path);
            }
        }
        Ok(())
    }

    /// A directory (and its parents).
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Entry::Dir(mode));
    }

    /// A copy of the host file `source`.
    pub fn file(&mut self, path: &str, mode: u32, source: &Path) {
        self.insert(path, Entry::File(mode, source.to_path_buf()));
    }

    /// A file holding `data`.
    pub fn bytes(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.insert(path, Entry::Bytes(mode, data.into()));
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent {
            let dir_name = dir.to_string_lossy();
            if !self.entries.contains_key(dir_name.as_ref()) {
                self.entries
                    .insert(dir_name.into_owned(), Entry::Dir(0o755));
            }
            parent = dir.parent();
        }
        self.entries.insert(path.to_owned(), entry);
    }

    /// Writes the image as an uncompressed newc cpio archive to `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let file = std::fs::File::create(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let mut w = cpio::Writer::new(BufWriter::new(file));
        for (path, entry) in &self.entries {
            // The root directory's entry is ".": its mode is the mount's.
            let name = if path == "/" { "." } else { path.as_str() };
            let result = match entry {
                Entry::Dir(mode) => w.dir(name, *mode),
                Entry::File(mode, source) => {
                    let data = std::fs::read(source)
                        .with_context(|| format!("cannot read {}", source.display()))?;
                    w.file(name, *mode, &data)
                }
                Entry::Bytes(mode, data) => w.file(name, *mode, data),
                Entry::Symlink(target) => w.symlink(name, target),
                Entry::CharDev(mode, major, minor) => w.char_dev(name, *mode, *major, *minor),
            };
            result.with_context(|| format!("cannot write {path} into {}", out.display()))?;
        }
        w.finish()
            .with_context(|| format!("cannot write {}", out.display()))?;
        Ok(())
    }
}
