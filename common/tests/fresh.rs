//! The committed objects were built from the sources and headers next to them: clang
//! records each file's MD5 in the object's DWARF line table, so a header changed without
//! a rebuild (the mirrors then checked against a stale BTF) fails here, without clang.
//! CI's rebuild compares the objects too; this runs everywhere `cargo test` does.

use handoff_ebpf::OBJECTS;
use object::{Object, ObjectSection};

/// A source file of `ebpf/`: its name and its bytes.
type Source = (&'static str, &'static [u8]);

/// Each object's sources in `ebpf/`: the program and the header it shares with Rust.
const SOURCES: [(&str, &[Source]); 3] = [
    (
        "handoff.bpf.o",
        &[
            ("handoff.bpf.c", include_bytes!("../../ebpf/handoff.bpf.c")),
            ("handoff.h", include_bytes!("../../ebpf/handoff.h")),
        ],
    ),
    (
        "drain.bpf.o",
        &[
            ("drain.bpf.c", include_bytes!("../../ebpf/drain.bpf.c")),
            ("drain.h", include_bytes!("../../ebpf/drain.h")),
        ],
    ),
    (
        "guard.bpf.o",
        &[("guard.bpf.c", include_bytes!("../../ebpf/guard.bpf.c"))],
    ),
];

/// MD5 (RFC 1321): only to compare with what clang wrote, no security involved.
fn md5(input: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4294967296.0) as u32)
        .collect();
    let mut msg = input.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((input.len() as u64).wrapping_mul(8)).to_le_bytes());
    let mut h: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    for chunk in msg.chunks_exact(64) {
        let m: Vec<u32> = chunk
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect();
        let [mut a, mut b, mut c, mut d] = h;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 16];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

#[test]
fn md5_is_md5() {
    let hex = |d: [u8; 16]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(
        hex(md5(b"The quick brown fox jumps over the lazy dog")),
        "9e107d9d372bb6826bd81d3542a419d6"
    );
}

#[test]
fn committed_objects_were_built_from_these_sources() {
    for (object, sources) in SOURCES {
        let bytes = OBJECTS
            .iter()
            .find(|(name, _)| *name == object)
            .map(|(_, b)| *b)
            .unwrap_or_else(|| panic!("{object} not in handoff_ebpf::OBJECTS"));
        let file = object::File::parse(bytes).expect("an ELF object");
        let lines = file
            .section_by_name(".debug_line")
            .unwrap_or_else(|| panic!("{object} has no line table (built without -g?)"))
            .data()
            .expect("the section's bytes");
        for (source, text) in sources {
            let digest = md5(text);
            assert!(
                lines.windows(16).any(|w| w == digest),
                "ebpf/{object} was not built from this ebpf/{source}: run `cargo xtask build-ebpf` and commit the object"
            );
        }
    }
}
