//! The layering of `src/` as the compiler would see it, checked: no two modules may depend on
//! each other, directly or around a circle, and the top-level modules depend only downwards in
//! the order ARCHITECTURE.md's "Layers" block lists them.
//!
//! How edges are found: every `use crate::…`, `use super::…`, `use self::…` tree and every
//! inline `crate::a::b` / `super::a` path outside comments and outside the file's
//! `#[cfg(test)]` tail (tests may reach anywhere) is one edge from the file's module to the
//! module the path names. Names a `mod.rs` re-exports (`pub use child::X`) are followed to the
//! child that defines them.
//!
//! How cycles are judged: at each module `P`, the nodes are `P`'s own file (its `mod.rs` or
//! `lib.rs` body) and each child module with everything below it. An edge from anywhere under
//! child `A` to anywhere under child `B` is an edge `A → B` at level `P`; an edge to an item of
//! `P`'s own file is `A → P(self)`. Every level's graph must be acyclic. So a `mod.rs` may
//! orchestrate its children, or its children may share vocabulary it defines, but not both.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One module file: its module path (`["sync", "agent", "control"]`) and its text.
struct ModFile {
    path: Vec<String>,
    file: PathBuf,
    /// Whether the file is a `mod.rs`/`lib.rs`, whose `super` is one level further up.
    is_dir_module: bool,
    text: String,
}

fn collect(dir: &Path, prefix: &[String], out: &mut Vec<ModFile>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read src/")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            let mut pre = prefix.to_vec();
            pre.push(name);
            collect(&p, &pre, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let (path, is_dir_module) = match stem {
                "mod" | "lib" => (prefix.to_vec(), true),
                "main" => continue, // the binary: a separate crate that only calls the library
                _ => {
                    let mut v = prefix.to_vec();
                    v.push(stem.to_string());
                    (v, false)
                }
            };
            let text = fs::read_to_string(&p).expect("read source");
            out.push(ModFile {
                path,
                file: p,
                is_dir_module,
                text,
            });
        }
    }
}

/// The file's code without comments and without its `#[cfg(test)]` tail.
fn code_of(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        // A trailing comment: cut at `//` when it is not inside a string literal.
        let mut in_str = false;
        let mut cut = line.len();
        let b = line.as_bytes();
        let mut k = 0;
        while k < b.len() {
            match b[k] {
                b'\\' if in_str => k += 1,
                b'"' => in_str = !in_str,
                b'/' if !in_str && b.get(k + 1) == Some(&b'/') => {
                    cut = k;
                    break;
                }
                _ => {}
            }
            k += 1;
        }
        lines.push((i + 1, line[..cut].to_string()));
    }
    lines
}

/// Expands a `use` tree (`crate::{a, b::{c, d as e}}`) into its leaf paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn split_top(s: &str) -> Vec<&str> {
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        parts
    }
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.trim();
    if tree.is_empty() {
        return Vec::new();
    }
    if let Some(open) = tree.find('{') {
        let prefix = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').expect("balanced use tree")];
        let base: Vec<String> = prefix
            .split("::")
            .filter(|s| !s.is_empty())
            .map(|s| s.trim().to_string())
            .collect();
        let mut out = Vec::new();
        for part in split_top(inner) {
            for tail in expand_use(part) {
                let mut p = base.clone();
                p.extend(tail.into_iter().filter(|s| s != "self"));
                out.push(p);
            }
        }
        out
    } else {
        let path = tree.split(" as ").next().unwrap().trim();
        vec![path.split("::").map(|s| s.trim().to_string()).collect()]
    }
}

/// Every path the code names, with its line and how deep inside inline `mod x { … }` blocks of
/// the file it sits (their `super` is the file's module): `use` trees and inline
/// `crate::`/`super::` paths. Inline modules are found by rustfmt's layout: `mod x {` closes at
/// the first `}` with the same indentation.
fn referenced_paths(code: &[(usize, String)]) -> Vec<(usize, Vec<String>, usize)> {
    let mut out = Vec::new();
    let mut inline: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < code.len() {
        let (line_no, line) = &code[i];
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if inline.last() == Some(&indent) && t.starts_with('}') {
            inline.pop();
        }
        let decl = t.strip_prefix("pub ").unwrap_or(t);
        if decl.starts_with("mod ") && decl.trim_end().ends_with('{') {
            inline.push(indent);
            i += 1;
            continue;
        }
        let depth = inline.len();
        let after_vis = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub(super) "))
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if let Some(rest) = after_vis.strip_prefix("use ") {
            let mut stmt = rest.to_string();
            while !stmt.contains(';') && i + 1 < code.len() {
                i += 1;
                stmt.push(' ');
                stmt.push_str(&code[i].1);
            }
            let stmt = stmt.split(';').next().unwrap();
            for p in expand_use(stmt) {
                out.push((*line_no, p, depth));
            }
            i += 1;
            continue;
        }
        for anchor in ["crate::", "super::"] {
            let mut from = 0;
            while let Some(pos) = line[from..].find(anchor) {
                let start = from + pos;
                let before = line[..start].chars().last();
                from = start + anchor.len();
                if matches!(before, Some(c) if c.is_alphanumeric() || c == '_' || c == ':') {
                    continue; // part of a longer path (`super::super::x` is read from its start)
                }
                let path: String = line[start..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let path = path
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                out.push((*line_no, path, depth));
            }
        }
        i += 1;
    }
    out
}

/// Resolves a referenced path to an absolute module-or-item path from the crate root. A path
/// that starts with the name of one of the file's own child modules (`use metrics::X` in a
/// `mod.rs`) is relative to the file; other bare paths name external crates.
fn absolute(
    from: &ModFile,
    path: &[String],
    depth: usize,
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = from.path.clone();
    let mut rest = path;
    // Inside inline modules, the first `super`s climb back to the file's own module.
    let mut inner = depth;
    while inner > 0 && rest.first().map(String::as_str) == Some("super") {
        rest = &rest[1..];
        inner -= 1;
    }
    if inner < depth && rest.first().map(String::as_str) != Some("super") {
        base.extend(rest.iter().cloned());
        return Some(base); // an item of the file itself
    }
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("super") | Some("self") => {
            if !from.is_dir_module && rest[0] == "super" {
                base.pop();
                rest = &rest[1..];
            } else if rest[0] == "self" {
                rest = &rest[1..];
            }
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        Some(first) => {
            let mut child = from.path.clone();
            child.push(first.to_string());
            if !modules.contains(&child) {
                return None; // an external crate or a local name
            }
        }
        None => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

struct Tree {
    /// Every module path that has a file.
    modules: BTreeSet<Vec<String>>,
    /// `pub use` re-exports of each module file: name → the child module it comes from.
    reexports: BTreeMap<Vec<String>, BTreeMap<String, String>>,
}

impl Tree {
    /// The longest module prefix of `target`, following one re-export step per level.
    fn module_of(&self, target: &[String]) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        for seg in target {
            let mut next = m.clone();
            next.push(seg.clone());
            if self.modules.contains(&next) {
                m = next;
                continue;
            }
            if let Some(child) = self.reexports.get(&m).and_then(|r| r.get(seg)) {
                let mut via = m.clone();
                via.push(child.clone());
                if self.modules.contains(&via) {
                    m = via;
                }
            }
            break;
        }
        m
    }
}

/// One edge at one level: `from` child → `to` child (`"(self)"` for the level's own file).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    level: Vec<String>,
    from: String,
    to: String,
}

const SELF: &str = "(self)";

fn level_edge(from: &[String], to: &[String]) -> Option<Edge> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() && common == to.len() {
        return None; // within one file
    }
    let level = from[..common].to_vec();
    let name = |p: &[String]| p.get(common).cloned().unwrap_or_else(|| SELF.to_string());
    Some(Edge {
        level,
        from: name(from),
        to: name(to),
    })
}

fn load() -> (Vec<ModFile>, Tree) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &[], &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.path.clone()).collect();
    let mut reexports = BTreeMap::new();
    for f in files.iter().filter(|f| f.is_dir_module) {
        let mut names = BTreeMap::new();
        for (_, p, depth) in referenced_paths(&code_of(&f.text)) {
            let Some(abs) = absolute(f, &p, depth, &modules) else {
                continue;
            };
            if abs.len() == f.path.len() + 2 && abs[..f.path.len()] == f.path[..] {
                let child = &abs[f.path.len()];
                let mut cm = f.path.clone();
                cm.push(child.clone());
                if modules.contains(&cm) {
                    names.insert(abs[f.path.len() + 1].clone(), child.clone());
                }
            }
        }
        reexports.insert(f.path.clone(), names);
    }
    (files, Tree { modules, reexports })
}

/// Every level edge with one place that makes it: `file:line`.
fn edges() -> BTreeMap<Edge, String> {
    let (files, tree) = load();
    let mut out = BTreeMap::new();
    for f in &files {
        for (line, p, depth) in referenced_paths(&code_of(&f.text)) {
            let Some(abs) = absolute(f, &p, depth, &tree.modules) else {
                continue;
            };
            let target = tree.module_of(&abs);
            // A `mod.rs` naming its own child through `self::child` is the parent using it.
            if let Some(e) = level_edge(&f.path, &target) {
                let rel = f
                    .file
                    .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                    .unwrap_or(&f.file);
                out.entry(e)
                    .or_insert_with(|| format!("{}:{line}", rel.display()));
            }
        }
    }
    out
}

/// Strongly connected components with more than one node, per level (Tarjan).
fn cycles(edges: &BTreeMap<Edge, String>) -> Vec<(Vec<String>, Vec<String>)> {
    let mut by_level: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for e in edges.keys() {
        let g = by_level.entry(e.level.clone()).or_default();
        g.entry(e.from.clone()).or_default().insert(e.to.clone());
        g.entry(e.to.clone()).or_default();
    }
    let mut found = Vec::new();
    for (level, g) in by_level {
        let nodes: Vec<&String> = g.keys().collect();
        let idx: BTreeMap<&String, usize> =
            nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let n = nodes.len();
        let (mut index, mut low, mut on) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
        let (mut stack, mut counter) = (Vec::new(), 0);
        fn strong(
            v: usize,
            g: &BTreeMap<String, BTreeSet<String>>,
            nodes: &[&String],
            idx: &BTreeMap<&String, usize>,
            st: (
                &mut Vec<usize>,
                &mut Vec<usize>,
                &mut Vec<bool>,
                &mut Vec<usize>,
                &mut usize,
            ),
            found: &mut Vec<Vec<String>>,
        ) {
            let (index, low, on, stack, counter) = st;
            index[v] = *counter;
            low[v] = *counter;
            *counter += 1;
            stack.push(v);
            on[v] = true;
            for w in &g[nodes[v]] {
                let w = idx[w];
                if index[w] == usize::MAX {
                    strong(w, g, nodes, idx, (index, low, on, stack, counter), found);
                    low[v] = low[v].min(low[w]);
                } else if on[w] {
                    low[v] = low[v].min(index[w]);
                }
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                loop {
                    let w = stack.pop().unwrap();
                    on[w] = false;
                    comp.push(nodes[w].clone());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    found.push(comp);
                }
            }
        }
        let mut comps = Vec::new();
        for v in 0..n {
            if index[v] == usize::MAX {
                strong(
                    v,
                    &g,
                    &nodes,
                    &idx,
                    (&mut index, &mut low, &mut on, &mut stack, &mut counter),
                    &mut comps,
                );
            }
        }
        found.extend(comps.into_iter().map(|c| (level.clone(), c)));
    }
    found
}

#[test]
fn no_module_depends_on_itself_around_a_circle() {
    let edges = edges();
    let found = cycles(&edges);
    let mut report = String::new();
    for (level, comp) in &found {
        let at = if level.is_empty() {
            "crate".to_string()
        } else {
            level.join("::")
        };
        report.push_str(&format!("\ncycle in `{at}` among {comp:?}:\n"));
        for (e, place) in &edges {
            if &e.level == level && comp.contains(&e.from) && comp.contains(&e.to) {
                report.push_str(&format!("  {} -> {}   ({place})\n", e.from, e.to));
            }
        }
    }
    assert!(found.is_empty(), "modules that import each other:{report}");
}

/// The top-level order ARCHITECTURE.md's "Layers" block gives, highest first.
fn declared_layers() -> Vec<Vec<String>> {
    let arch = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
        .expect("read ARCHITECTURE.md");
    let start = arch
        .find("<!-- layers -->")
        .expect("ARCHITECTURE.md has a `<!-- layers -->` block");
    let block = &arch[start..];
    let block = &block[..block
        .find("<!-- /layers -->")
        .expect("the layers block is closed")];
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|l| {
            l.split(':')
                .next()
                .unwrap()
                .split(',')
                .map(|m| m.trim().trim_matches('`').to_string())
                .filter(|m| !m.is_empty())
                .collect()
        })
        .collect()
}

#[test]
fn top_level_modules_depend_only_downwards_as_architecture_md_draws() {
    let layers = declared_layers();
    let rank: BTreeMap<String, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, ms)| ms.iter().map(move |m| (m.clone(), i)))
        .collect();
    let (files, _) = load();
    let top: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.path.first().cloned())
        .collect();
    let unlisted: Vec<_> = top.iter().filter(|m| !rank.contains_key(*m)).collect();
    assert!(
        unlisted.is_empty(),
        "top-level modules missing from ARCHITECTURE.md's layers: {unlisted:?}"
    );
    let mut wrong = String::new();
    for (e, place) in edges() {
        if !e.level.is_empty() || e.from == SELF || e.to == SELF {
            continue;
        }
        let (f, t) = (rank[&e.from], rank[&e.to]);
        if t <= f {
            let why = if t == f {
                "the same layer"
            } else {
                "a higher layer"
            };
            wrong.push_str(&format!("\n  {} -> {} ({why}; {place})", e.from, e.to));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not point down the layers of ARCHITECTURE.md:{wrong}"
    );
}

#[test]
fn the_checker_sees_use_trees_and_relative_paths() {
    let code = code_of(
        "use crate::{config::{Config, raw::Raw as R}, router};\n\
         let x = super::fast::MAX; // crate::not::this\n\
         let s = \"http://x\"; crate::dns::serve();\n",
    );
    let paths: Vec<Vec<String>> = referenced_paths(&code)
        .into_iter()
        .map(|(_, p, _)| p)
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(paths.contains(&s(&["crate", "config", "Config"])));
    assert!(paths.contains(&s(&["crate", "config", "raw", "Raw"])));
    assert!(paths.contains(&s(&["crate", "router"])));
    assert!(paths.contains(&s(&["super", "fast", "MAX"])));
    assert!(paths.contains(&s(&["crate", "dns", "serve"])));
    assert!(!paths.iter().any(|p| p.contains(&"not".to_string())));
    let e = level_edge(&s(&["dns", "handler"]), &s(&["dns", "fast"])).unwrap();
    assert_eq!(
        (e.level, e.from, e.to),
        (s(&["dns"]), "handler".into(), "fast".into())
    );
    let e = level_edge(&s(&["sync", "agent", "control"]), &s(&["sync", "agent"])).unwrap();
    assert_eq!((e.from, e.to), ("control".into(), SELF.into()));
}
