//! A token scan of Rust source, enough for the layer and length checks: comments and
//! literals blanked, `#[cfg(test)]` modules found, `crate::`/`super::` paths and `fn`
//! bodies located. Not a parser: macros and inline modules other than test modules are
//! read as plain code.

/// `text` with comments, string and char literals replaced by spaces; newlines are kept,
/// so byte offsets and line numbers are those of the original.
pub fn blank(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment_end(b, i),
            b'"' => i = string_end(b, i + 1, 0),
            b'r' if is_raw_string(b, i) => {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                i = string_end(b, i + 2 + hashes, hashes);
            }
            b'\'' => match char_literal_end(b, i) {
                Some(end) => i = end,
                None => {
                    // A lifetime: kept.
                    i += 1;
                    continue;
                }
            },
            _ => {
                i += 1;
                continue;
            }
        }
        for c in &mut out[start..i.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    }
    // Only ASCII bytes were replaced, and only whole literals or comments: still UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

/// The end (exclusive) of the block comment opening at `i`, nested comments included.
fn block_comment_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Whether a raw string (`r"`, `r#"`, …) opens at `i` (and not an identifier ending in r).
fn is_raw_string(b: &[u8], i: usize) -> bool {
    // `br"…"` is a raw byte string; any other identifier character before `r` is a name.
    let before = if i > 0 && b[i - 1] == b'b' { i - 1 } else { i };
    if before > 0 && is_ident(b[before - 1]) {
        return false;
    }
    let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
    b.get(i + 1 + hashes) == Some(&b'"')
}

/// The end (exclusive) of a string whose body starts at `i`, closed by `"` and `hashes` #.
fn string_end(b: &[u8], mut i: usize, hashes: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' if hashes == 0 => i += 2,
            b'"' if b[i + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == b'#')
                .count()
                == hashes =>
            {
                return i + 1 + hashes;
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// The end (exclusive) of the char literal opening at `i`, or None for a lifetime.
fn char_literal_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i + 1) == Some(&b'\\') {
        let close = b[i + 2..].iter().position(|&c| c == b'\'')?;
        return Some(i + 2 + close + 1);
    }
    // One character, possibly several UTF-8 bytes, then the closing quote.
    let s = std::str::from_utf8(&b[i + 1..]).ok()?;
    let c = s.chars().next()?;
    (b.get(i + 1 + c.len_utf8()) == Some(&b'\'')).then_some(i + 2 + c.len_utf8())
}

/// Whether `c` can be part of an identifier.
pub fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The 1-based line of byte offset `at`.
pub fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at]
        .iter()
        .filter(|&&c| c == b'\n')
        .count()
        + 1
}

/// The offset just after the `}` matching the `{` at `open`.
fn matching_brace(b: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    b.len()
}

/// Byte ranges of the `#[cfg(test)] mod NAME { … }` blocks in blanked `text`.
pub fn test_modules(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]") {
        let attr = from + at;
        from = attr + 1;
        let rest = text[attr + "#[cfg(test)]".len()..].trim_start();
        let rest = rest.strip_prefix("pub ").unwrap_or(rest);
        if !rest.starts_with("mod ") {
            continue;
        }
        let Some(open) = text[attr..].find('{').map(|o| attr + o) else {
            continue;
        };
        if text[attr..open].contains(';') {
            continue; // `mod tests;`: the tests live in another file.
        }
        let end = matching_brace(b, open);
        ranges.push((attr, end));
        from = end;
    }
    ranges
}

/// A path leaving the current module: `crate::NAME` or `super::…::NAME` reaching the root.
#[derive(Debug, PartialEq, Eq)]
pub struct Use {
    /// The 1-based line of the path.
    pub line: usize,
    /// How many `super::` the path starts with (0 for `crate::`).
    pub supers: usize,
    /// The first name after the prefix (each name of a `{…}` group is one `Use`).
    pub name: String,
    /// The name after it, if the path goes on (`crate::a::b` or `crate::a::{b, c}`: one
    /// `Use` each); `self` is none.
    pub sub: Option<String>,
}

/// The `crate::` and `super::` paths of blanked `text`, outside `skip` ranges.
pub fn uses(text: &str, skip: &[(usize, usize)]) -> Vec<Use> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let in_skip = skip.iter().any(|&(s, e)| (s..e).contains(&i));
        let boundary = i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b'$' || b[i - 1] == b':');
        if in_skip || !boundary {
            i += 1;
            continue;
        }
        let (supers, after) = if text[i..].starts_with("crate::") {
            (0, i + "crate::".len())
        } else if text[i..].starts_with("super::") {
            let mut j = i;
            let mut n = 0;
            while text[j..].starts_with("super::") {
                n += 1;
                j = skip_ws(b, j + "super::".len());
            }
            (n, j)
        } else {
            i += 1;
            continue;
        };
        let line = line_of(text, i);
        for mut path in paths_at(b, skip_ws(b, after), 2) {
            let sub = (path.len() > 1).then(|| path.remove(1));
            let name = path.remove(0);
            found.push(Use {
                line,
                supers,
                name,
                sub,
            });
        }
        i = after;
    }
    found
}

/// The offset of the first non-whitespace byte at or after `i`.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The paths (at most `depth` names each) of the use tree at `i`: a path, or a `{…}`
/// group of them; `self` ends a path.
fn paths_at(b: &[u8], i: usize, depth: usize) -> Vec<Vec<String>> {
    if b.get(i) == Some(&b'{') {
        return group_entries(b, i)
            .into_iter()
            .flat_map(|j| paths_at(b, j, depth))
            .collect();
    }
    let Some(name) = ident_at(b, i).filter(|n| n != "self") else {
        return Vec::new();
    };
    let k = skip_ws(b, i + name.len());
    let subs = if depth > 1 && b[k.min(b.len())..].starts_with(b"::") {
        paths_at(b, skip_ws(b, k + 2), depth - 1)
    } else {
        Vec::new()
    };
    let mut rest: Vec<Vec<String>> = subs
        .into_iter()
        .map(|mut sub| {
            sub.insert(0, name.clone());
            sub
        })
        .collect();
    if rest.is_empty() || rest.len() < group_len(b, k) {
        rest.push(vec![name]);
    }
    rest
}

/// Where each entry of the `{…}` group at `i` starts.
fn group_entries(b: &[u8], i: usize) -> Vec<usize> {
    let end = matching_brace(b, i);
    let mut starts = Vec::new();
    let (mut depth, mut entry_start) = (0, true);
    for (j, &c) in b.iter().enumerate().take(end).skip(i) {
        match c {
            b'{' => {
                depth += 1;
                entry_start = depth == 1;
            }
            b'}' => depth -= 1,
            b',' if depth == 1 => entry_start = true,
            c if entry_start && depth == 1 && is_ident(c) => {
                starts.push(j);
                entry_start = false;
            }
            _ => {}
        }
    }
    starts
}

/// How many entries the group after `name::` at `k` (the `::`) has.
fn group_len(b: &[u8], k: usize) -> usize {
    let g = skip_ws(b, k + 2);
    if b.get(g) == Some(&b'{') {
        group_entries(b, g).len()
    } else {
        0
    }
}

/// The identifier starting at `i`, if one does.
fn ident_at(b: &[u8], i: usize) -> Option<String> {
    let len = b[i.min(b.len())..]
        .iter()
        .take_while(|&&c| is_ident(c))
        .count();
    (len > 0).then(|| String::from_utf8_lossy(&b[i..i + len]).into_owned())
}

/// A function with a body: its name, its first line and its length in lines.
#[derive(Debug, PartialEq, Eq)]
pub struct Function {
    /// The function's name.
    pub name: String,
    /// The 1-based line of its `fn` keyword.
    pub line: usize,
    /// Lines from the `fn` keyword to the closing brace, both included.
    pub lines: usize,
}

/// The functions with a body in blanked `text` (nested ones too, each on its own).
pub fn functions(text: &str) -> Vec<Function> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("fn ") {
        let kw = from + at;
        from = kw + 3;
        if kw > 0 && is_ident(b[kw - 1]) {
            continue;
        }
        let Some(name) = ident_at(b, skip_ws(b, kw + 3)) else {
            continue;
        };
        let Some(open) = body_open(b, kw) else {
            continue;
        };
        let end = matching_brace(b, open);
        let line = line_of(text, kw);
        found.push(Function {
            name,
            line,
            lines: line_of(text, end.saturating_sub(1)) - line + 1,
        });
    }
    found
}

/// The `{` opening the body of the function whose `fn` is at `kw`: the first `{` outside
/// brackets, or None at a `;` first (a declaration: `fn f(&self);`).
fn body_open(b: &[u8], kw: usize) -> Option<usize> {
    let mut depth = 0i32;
    for (i, &c) in b.iter().enumerate().skip(kw) {
        match c {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth -= 1,
            b'{' if depth == 0 => return Some(i),
            b';' if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_literals_are_blanked() {
        let text = "a // crate::x\n\"crate::y\" 'c' '\\'' r#\"crate::z\"# br\"crate::w\\\" /* crate:: */ b\n";
        let blanked = blank(text);
        assert_eq!(blanked.len(), text.len());
        assert!(!blanked.contains("crate"), "{blanked}");
        assert!(blanked.starts_with("a ") && blanked.trim_end().ends_with('b'));
        assert_eq!(blanked.lines().count(), 2);
        // A lifetime is not a char literal.
        assert_eq!(blank("fn f<'a>(x: &'a str) {}"), "fn f<'a>(x: &'a str) {}");
    }

    #[test]
    fn paths_and_groups_are_found() {
        let text = blank(
            "use crate::config::Config;\nuse crate::{a::B, c, d::{e, f}};\n\
             fn g() { super::super::h::i(); $crate::no; other::crate::no; }\n",
        );
        let found: Vec<_> = uses(&text, &[])
            .into_iter()
            .map(|u| (u.line, u.supers, u.name, u.sub))
            .collect();
        let want = [
            (1, 0, "config", Some("Config")),
            (2, 0, "a", Some("B")),
            (2, 0, "c", None),
            (2, 0, "d", Some("e")),
            (2, 0, "d", Some("f")),
            (3, 2, "h", Some("i")),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|&(l, s, n, sub)| (l, s, n.to_owned(), sub.map(str::to_owned)))
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn self_in_a_group_names_the_module_itself() {
        let text = blank(
            "use crate::a::{self, b};
use crate::c::*;
",
        );
        let found: Vec<_> = uses(&text, &[])
            .into_iter()
            .map(|u| (u.name, u.sub))
            .collect();
        let want = [("a", Some("b")), ("a", None), ("c", None)];
        let want: Vec<_> = want
            .iter()
            .map(|&(n, sub)| (n.to_owned(), sub.map(str::to_owned)))
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn the_workspace_sources_blank_to_balanced_braces() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for dir in ["daemon/src", "common/src", "xtask/src"] {
            let mut dirs = vec![root.join(dir)];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).expect("a source directory") {
                    let path = entry.expect("an entry").path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else if path.extension().is_some_and(|e| e == "rs") {
                        let text = blank(&std::fs::read_to_string(&path).expect("a source"));
                        let open = text.matches('{').count();
                        let close = text.matches('}').count();
                        assert_eq!(open, close, "{}", path.display());
                    }
                }
            }
        }
    }

    #[test]
    fn test_modules_are_skipped() {
        let text =
            blank("use crate::a;\n#[cfg(test)]\nmod tests {\n use crate::b;\n}\nuse crate::c;\n");
        let skip = test_modules(&text);
        let names: Vec<_> = uses(&text, &skip).into_iter().map(|u| u.name).collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn function_lengths() {
        let text = blank(
            "trait T { fn d(&self); }\nfn one() {}\nfn two(\n) -> [u8; 1] {\n  \"}\"; 1\n}\n",
        );
        let found: Vec<_> = functions(&text)
            .into_iter()
            .map(|f| (f.name, f.line, f.lines))
            .collect();
        assert_eq!(found, [("one".into(), 2, 1), ("two".into(), 3, 4)]);
    }
}
