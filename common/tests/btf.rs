//! Every Rust mirror of a record of `ebpf/*.h` against the committed objects: size, and
//! each field's name, offset and size, as the BTF in `ebpf/*.bpf.o` gives them (what the
//! kernel and the program see), and as the header declares them (the records the
//! programs only write, which clang leaves out of BTF). No root, no clang.
//!
//! The BTF reader is a small one of our own: aya-obj parses BTF but keeps its type table
//! private, and the format's struct part is a few dozen lines. The `object` crate (already
//! built for aya-obj) finds the `.BTF` section.

use std::collections::BTreeMap;

use handoff_common::maps::records::{FieldLayout, Layout, MIRRORS};
use object::{Object, ObjectSection};

use handoff_ebpf::{HANDOFF_BPF, OBJECTS};

/// Where the records are declared: the headers, and the guard's source (its one record,
/// `struct guard_key`, has no header).
const HEADERS: [(&str, &str); 3] = [
    ("handoff.h", include_str!("../../ebpf/handoff.h")),
    ("drain.h", include_str!("../../ebpf/drain.h")),
    ("guard.bpf.c", include_str!("../../ebpf/guard.bpf.c")),
];

/// Records clang leaves out of the objects' BTF: written by the programs through a
/// pointer or a local variable, never a map's key or value. The header check covers them.
const NOT_IN_BTF: [&str; 3] = ["handoff_event", "handoff_listener", "handoff_proc"];

// BTF kinds (include/uapi/linux/btf.h).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FLOAT: u32 = 16;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// A record's layout as compared: size, then (name, offset, size) of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    size: usize,
    fields: Vec<(String, usize, usize)>,
}

impl From<Layout> for Shape {
    fn from(l: Layout) -> Shape {
        let field = |f: &FieldLayout| (f.name.to_string(), f.offset, f.size);
        let mut fields: Vec<_> = l.fields.iter().map(field).collect();
        // In memory order, as BTF and the header list them.
        fields.sort_by_key(|f| f.1);
        Shape {
            size: l.size,
            fields,
        }
    }
}

/// One BTF type: its kind, name, size-or-type word, and for a struct its members
/// (name, type id, offset word).
#[derive(Debug, Clone, Default)]
struct Type {
    kind: u32,
    kind_flag: bool,
    name: String,
    size_or_type: u32,
    /// ARRAY: element type, index type, count.
    array: [u32; 3],
    members: Vec<(String, u32, u32)>,
}

/// The types of a `.BTF` section, by id (id 0 is void).
struct Btf {
    types: Vec<Type>,
}

fn word(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

impl Btf {
    fn parse(data: &[u8]) -> Btf {
        assert_eq!(u16::from_le_bytes([data[0], data[1]]), 0xeb9f, "BTF magic");
        let hdr_len = word(data, 4) as usize;
        let (type_off, type_len) = (word(data, 8) as usize, word(data, 12) as usize);
        let str_off = word(data, 16) as usize;
        let strings = &data[hdr_len + str_off..];
        let string = |off: u32| {
            let s = &strings[off as usize..];
            let end = s.iter().position(|&b| b == 0).expect("a NUL");
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let section = &data[hdr_len + type_off..hdr_len + type_off + type_len];
        let mut types = vec![Type::default()];
        let mut at = 0;
        while at < section.len() {
            let info = word(section, at + 4);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            // Words after the 3-word header (VAR 14, DATASEC 15, FUNC_PROTO 13, DECL_TAG 17).
            let extra_words = match kind {
                INT | 14 | 17 => 1,
                ARRAY => 3,
                STRUCT | UNION | 15 | ENUM64 => 3 * vlen,
                ENUM | 13 => 2 * vlen,
                _ => 0,
            };
            let extra: Vec<u32> = (0..extra_words)
                .map(|i| word(section, at + 12 + 4 * i))
                .collect();
            let mut t = Type {
                kind,
                kind_flag: info >> 31 == 1,
                name: string(word(section, at)),
                size_or_type: word(section, at + 8),
                ..Type::default()
            };
            if kind == ARRAY {
                t.array = [extra[0], extra[1], extra[2]];
            }
            if kind == STRUCT || kind == UNION {
                t.members = extra
                    .chunks_exact(3)
                    .map(|m| (string(m[0]), m[1], m[2]))
                    .collect();
            }
            types.push(t);
            at += 12 + 4 * extra_words;
        }
        Btf { types }
    }

    /// The size in bytes of type `id`.
    fn size(&self, id: u32) -> usize {
        let t = &self.types[id as usize];
        match t.kind {
            INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT => t.size_or_type as usize,
            PTR => 8,
            ARRAY => t.array[2] as usize * self.size(t.array[0]),
            TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => self.size(t.size_or_type),
            other => panic!("no size for BTF kind {other} ({})", t.name),
        }
    }

    /// The names of the structs this BTF has.
    fn struct_names(&self) -> impl Iterator<Item = String> + '_ {
        self.types
            .iter()
            .filter(|t| t.kind == STRUCT && !t.name.is_empty())
            .map(|t| t.name.clone())
    }

    /// The shape of `struct name`, if this BTF has it.
    fn shape(&self, name: &str) -> Option<Shape> {
        let t = self
            .types
            .iter()
            .find(|t| t.kind == STRUCT && t.name == name)?;
        let fields = t
            .members
            .iter()
            .map(|(field, ty, offset)| {
                // With kind_flag, the top 8 bits are a bit field's width.
                assert!(
                    !t.kind_flag || offset >> 24 == 0,
                    "{name}.{field}: a bit field has no Rust mirror"
                );
                let bits = (offset & 0xff_ffff) as usize;
                assert_eq!(bits % 8, 0, "{name}.{field}: off a byte boundary");
                (field.clone(), bits / 8, self.size(*ty))
            })
            .collect();
        Some(Shape {
            size: t.size_or_type as usize,
            fields,
        })
    }
}

/// The `.BTF` of a committed object.
fn btf_of(name: &str, bytes: &[u8]) -> Btf {
    let file = object::File::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let section = file
        .section_by_name(".BTF")
        .unwrap_or_else(|| panic!("{name} has no .BTF section"));
    Btf::parse(section.data().expect("the section's bytes"))
}

/// The records `header` declares: `struct NAME {` to `};`, with `__uN name;` and
/// `__uN name[K];` fields laid out as C does (each at a multiple of its type's size).
fn header_shapes(header: &str) -> BTreeMap<String, Shape> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Shape, usize)> = None;
    for line in header.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("struct ")
            && let Some(name) = rest.strip_suffix(" {")
        {
            let empty = Shape {
                size: 0,
                fields: vec![],
            };
            current = Some((name.to_string(), empty, 1));
            continue;
        }
        let Some((name, shape, align)) = current.as_mut() else {
            continue;
        };
        if line == "};" {
            shape.size = shape.size.next_multiple_of(*align);
            out.insert(std::mem::take(name), shape.clone());
            current = None;
            continue;
        }
        let Some(decl) = line.strip_suffix(';') else {
            continue;
        };
        let (ty, field) = decl.split_once(' ').expect("TYPE NAME;");
        let unit = match ty {
            "__u8" => 1,
            "__u16" => 2,
            "__u32" => 4,
            "__u64" => 8,
            other => panic!("{name}: field type {other} not known to this test"),
        };
        let (field, count) = match field.split_once('[') {
            Some((f, n)) => (f, n.trim_end_matches(']').parse::<usize>().expect("[N]")),
            None => (field, 1),
        };
        let offset = shape.size.next_multiple_of(unit);
        shape.fields.push((field.to_string(), offset, unit * count));
        shape.size = offset + unit * count;
        *align = (*align).max(unit);
    }
    out
}

#[test]
fn every_mirror_matches_the_objects_btf_and_its_header() {
    let btfs: Vec<(&str, Btf)> = OBJECTS
        .iter()
        .map(|(name, bytes)| (*name, btf_of(name, bytes)))
        .collect();
    let mut declared: BTreeMap<String, (&str, Shape)> = BTreeMap::new();
    for (file, text) in HEADERS {
        for (name, shape) in header_shapes(text) {
            declared.insert(name, (file, shape));
        }
    }
    let mut mirrored = Vec::new();
    for layout in MIRRORS.iter().map(|f| f()) {
        let name = layout.c_name;
        let mirror = Shape::from(layout.clone());
        let (file, header) = declared
            .get(name)
            .unwrap_or_else(|| panic!("struct {name} is in no header"));
        assert_eq!(
            &mirror, header,
            "struct {name} of {file} and its Rust mirror"
        );
        let in_btf: Vec<(&str, Shape)> = btfs
            .iter()
            .filter_map(|(object, btf)| Some((*object, btf.shape(name)?)))
            .collect();
        for (object, shape) in &in_btf {
            assert_eq!(
                &mirror, shape,
                "struct {name} in {object} and its Rust mirror"
            );
        }
        assert_eq!(
            in_btf.is_empty(),
            NOT_IN_BTF.contains(&name),
            "struct {name}: in the BTF of {:?}; update NOT_IN_BTF",
            in_btf.iter().map(|(o, _)| *o).collect::<Vec<_>>()
        );
        mirrored.push(name);
    }
    // Every record of ours, in a header or only in an object's BTF, has its mirror.
    let ours = |name: &str| name.starts_with("handoff_") || name.starts_with("guard_");
    let in_objects = btfs.iter().flat_map(|(_, btf)| btf.struct_names());
    let unmirrored: Vec<String> = declared
        .keys()
        .cloned()
        .chain(in_objects.filter(|n| ours(n)))
        .filter(|n| !mirrored.contains(&n.as_str()))
        .collect();
    assert!(
        unmirrored.is_empty(),
        "records of ebpf/ without a mirror in common/src/maps/records.rs: {unmirrored:?}"
    );
}

#[test]
fn the_reader_finds_known_kernel_structs() {
    // A struct of the kernel's own in the steering object: the reader follows
    // unions and arrays without tripping.
    let btf = btf_of("handoff.bpf.o", HANDOFF_BPF);
    let md = btf.shape("sk_reuseport_md").expect("sk_reuseport_md");
    assert_eq!(md.size, 56);
}
