//! An uncompressed cpio archive in the "newc" format (`070701`), the format the kernel
//! unpacks as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Every entry gets its own inode number and one link, so the kernel never takes two
//! entries for hard links of one file. Owner is root unless given ([`Writer::raw`]),
//! mtime 0 (the image is reproducible).

use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// The numeric fields of an entry's header.
struct Head {
    ino: u32,
    mode: u32,
    /// uid, gid.
    owner: (u32, u32),
    nlink: u32,
    /// Device major, minor.
    rdev: (u32, u32),
    size: u32,
}

/// Writes newc entries to `out`; [`Writer::finish`] writes the trailer.
pub struct Writer<W: Write> {
    out: W,
    /// Bytes written so far: entries are padded to 4-byte boundaries.
    written: u64,
    /// The next inode number.
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// A writer appending to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory with permission bits `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// A regular file with permission bits `perm` holding `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device `major:minor` with permission bits `perm`.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Any entry: `mode` with its file type bits, owner `uid`:`gid`, device `rdev` (for
    /// character and block devices), content `data` (a file's bytes, a link's target).
    pub fn raw(
        &mut self,
        path: &str,
        mode: u32,
        (uid, gid): (u32, u32),
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        self.entry_owned(path, mode, (uid, gid), nlink, rdev, data)
    }

    /// Writes the trailer entry and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        let trailer = Head {
            ino: 0,
            mode: 0,
            owner: (0, 0),
            nlink: 1,
            rdev: (0, 0),
            size: 0,
        };
        self.header("TRAILER!!!", trailer)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        self.entry_owned(path, mode, (0, 0), nlink, rdev, data)
    }

    fn entry_owned(
        &mut self,
        path: &str,
        mode: u32,
        owner: (u32, u32),
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{path}: larger than 4 GiB")))?;
        let head = Head {
            ino,
            mode,
            owner,
            nlink,
            rdev,
            size,
        };
        self.header(path, head)?;
        self.write_padded(data)
    }

    fn header(&mut self, name: &str, head: Head) -> io::Result<()> {
        // The kernel's names are relative to the root ("bin/sh", not "/bin/sh").
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::other(format!("bad cpio entry name {name:?}")));
        }
        let name_size = name.len() + 1;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check.
        let fields = [
            head.ino,
            head.mode,
            head.owner.0,
            head.owner.1,
            head.nlink,
            0,
            head.size,
            0,
            0,
            head.rdev.0,
            head.rdev.1,
            u32::try_from(name_size).map_err(|_| io::Error::other("cpio name too long"))?,
            0,
        ];
        let mut text = String::with_capacity(110 + name_size);
        text.push_str("070701");
        for field in fields {
            text.push_str(&format!("{field:08x}"));
        }
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        self.write_padded(&bytes)
    }

    /// Writes `data`, then zeros up to the next multiple of 4 bytes.
    fn write_padded(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        let pad = (4 - (self.written % 4)) % 4;
        self.out.write_all(&[0; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn entries_are_padded_and_end_with_the_trailer() {
        let mut w = Writer::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("bin/x", 0o755, b"hello").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // A directory: mode 040755, two links, name "bin" (namesize 4).
        assert!(text.starts_with("07070100000001000041ed0000000000000000000000020000000000000000"));
        assert!(text.contains("bin\0"));
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        // The console: mode 020600, rdev 5:1.
        assert!(text.contains("000021800000000000000000000000010000000000000000000000000000000000000005000000010000000c"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    /// Reads a newc archive back: (name, mode, rdev major, rdev minor, data) per entry.
    fn read_back(mut buf: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        let align = |n: usize| n.div_ceil(4) * 4;
        loop {
            assert_eq!(&buf[..6], b"070701", "magic at offset {offset}");
            let field = |i: usize| {
                let hex = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (mode, size, major, minor, name_size) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&buf[110..110 + name_size - 1])
                .unwrap()
                .to_owned();
            assert_eq!(buf[110 + name_size - 1], 0, "name of {name} ends with NUL");
            let data_at = align(110 + name_size);
            let data = buf[data_at..data_at + size].to_vec();
            let next = align(data_at + size);
            offset += next;
            buf = &buf[next..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty(), "nothing after the trailer");
                return entries;
            }
            entries.push((name, mode, major, minor, data));
        }
    }

    #[test]
    fn the_archive_reads_back() {
        let mut w = Writer::new(Vec::new());
        w.dir(".", 0o755).unwrap();
        w.dir("d", 0o700).unwrap();
        w.file("/d/f", 0o644, b"abcde").unwrap();
        w.symlink("d/l", "f").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let entries = read_back(&w.finish().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, [".", "d", "d/f", "d/l", "dev/console"]);
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(entries[2].1, 0o100_644);
        assert_eq!(entries[2].4, b"abcde");
        assert_eq!(
            (entries[3].1, entries[3].4.as_slice()),
            (0o120_777, b"f".as_slice())
        );
        assert_eq!(
            (entries[4].1, entries[4].2, entries[4].3),
            (0o020_600, 5, 1)
        );
    }
}
