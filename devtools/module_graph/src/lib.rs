//! Dev-only test helper: the import graph between the modules (files) of one crate's `src/`
//! directory, and [`assert_acyclic`] for a test that fails on an import cycle.
//!
//! Nodes are module files, found by following `mod name;` from `lib.rs` (and `main.rs`, a
//! crate of its own). An edge `a -> b` means code in `a` names something in `b` through a
//! path: `use crate::b::X`, `crate::b::f()`, `super::b`, `self::b`, or a child module by its
//! bare name. Re-exports are transparent: a name that `lib.rs` or a `mod.rs` re-exports with
//! `pub use` leads to the module that defines it, so a facade file does not make a cycle
//! between its children. A submodule naming items of its own ancestors (`super::Type` where
//! the parent file defines `Type`) is not an edge: that is containment, the way one type's
//! impl blocks are spread over files. Comments and string literals are ignored;
//! `#[cfg(test)]` modules count (test code is code). Paths into other crates are not edges.
//!
//! Usage, in a crate's tests: `module_graph::assert_acyclic(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// A module path inside its crate: `[]` is the crate root, `["tcp", "mesh"]` is `tcp::mesh`.
pub type ModPath = Vec<String>;

/// One module file and what it says.
#[derive(Debug)]
struct Module {
    file: PathBuf,
    children: BTreeSet<String>,
    /// Every path the file names, with its line (segments as written, e.g. `["crate", "tcp", "X"]`).
    paths: Vec<(usize, Vec<String>)>,
    /// `pub use` items: (name it is known by here, path as written); name `*` for a glob.
    reexports: Vec<(String, Vec<String>)>,
}

/// The import graph of one crate root: edges with the first place each one is made.
#[derive(Debug, Default)]
pub struct ImportGraph {
    /// `edges[a][b]` = `file:line` where `a` first names something in `b`.
    pub edges: BTreeMap<String, BTreeMap<String, String>>,
}

impl ImportGraph {
    /// A cycle as `a -> b -> ... -> a`, each step with where it is made, or `None`.
    pub fn find_cycle(&self) -> Option<Vec<(String, String)>> {
        let nodes: BTreeSet<&String> = self
            .edges
            .keys()
            .chain(self.edges.values().flat_map(|m| m.keys()))
            .collect();
        let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 = on stack, 2 = done
        for start in nodes {
            let mut stack: Vec<&str> = Vec::new();
            if let Some(c) = self.visit(start, &mut state, &mut stack) {
                return Some(c);
            }
        }
        None
    }

    fn visit<'a>(
        &'a self,
        node: &'a str,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<(String, String)>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let from = stack.iter().position(|n| *n == node).expect("on the stack");
                let mut cycle: Vec<&str> = stack[from..].to_vec();
                cycle.push(node);
                return Some(
                    cycle
                        .windows(2)
                        .map(|w| {
                            (
                                format!("{} -> {}", w[0], w[1]),
                                self.edges[w[0]][w[1]].clone(),
                            )
                        })
                        .collect(),
                );
            }
            _ => {}
        }
        state.insert(node, 1);
        stack.push(node);
        if let Some(next) = self.edges.get(node) {
            for target in next.keys() {
                if let Some(c) = self.visit(target, state, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        state.insert(node, 2);
        None
    }
}

/// The graphs of `src_dir`'s crate roots (`lib.rs`, `main.rs`: whichever exist), by root file
/// name. Panics with a message naming the file if a declared module file is missing.
pub fn import_graphs(src_dir: impl AsRef<Path>) -> Vec<(String, ImportGraph)> {
    let src_dir = src_dir.as_ref();
    let mut out = Vec::new();
    for root in ["lib.rs", "main.rs"] {
        let file = src_dir.join(root);
        if file.exists() {
            let modules = collect_modules(&file);
            out.push((root.to_string(), build_graph(&modules)));
        }
    }
    assert!(
        !out.is_empty(),
        "{} has neither lib.rs nor main.rs",
        src_dir.display()
    );
    out
}

/// Panics, naming every step of the first cycle found, if a crate root in `src_dir` has an
/// import cycle among its modules.
pub fn assert_acyclic(src_dir: impl AsRef<Path>) {
    for (root, graph) in import_graphs(src_dir.as_ref()) {
        if let Some(cycle) = graph.find_cycle() {
            let steps: Vec<String> = cycle
                .iter()
                .map(|(e, at)| format!("  {e}   ({at})"))
                .collect();
            panic!(
                "import cycle among the modules of {} ({root}):\n{}",
                src_dir.as_ref().display(),
                steps.join("\n")
            );
        }
    }
}

fn name_of(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_string()
    } else {
        path.join("::")
    }
}

// ---- reading the files -----------------------------------------------------------------

fn collect_modules(root: &Path) -> BTreeMap<ModPath, Module> {
    let mut modules = BTreeMap::new();
    let mut todo: Vec<(ModPath, PathBuf)> = vec![(Vec::new(), root.to_path_buf())];
    while let Some((path, file)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let module = parse_module(&file, &strip_comments_and_strings(&text));
        // Children of `a/mod.rs`, `lib.rs` and `main.rs` live beside it; those of `a.rs` in `a/`.
        let dir = match file.file_name().and_then(|n| n.to_str()) {
            Some("mod.rs" | "lib.rs" | "main.rs") => file.parent().expect("in a dir").to_path_buf(),
            _ => file.with_extension(""),
        };
        for child in &module.children {
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(child).join("mod.rs");
            let child_file = if flat.exists() { flat } else { nested };
            assert!(
                child_file.exists(),
                "{}: `mod {child};` but neither {child}.rs nor {child}/mod.rs exists in {}",
                file.display(),
                dir.display()
            );
            let mut child_path = path.clone();
            child_path.push(child.clone());
            todo.push((child_path, child_file));
        }
        modules.insert(path, module);
    }
    modules
}

/// The text with comments and the insides of string and char literals blanked (newlines kept,
/// so line numbers stay right).
fn strip_comments_and_strings(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && matches!(c.get(i + 1), Some('"' | '#'))
            && !ident_char_before(&c, i)
        {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            out.push('"');
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                out.push(blank(c[j]));
                j += 1;
            }
            out.push('"');
            i = j;
        } else if c[i] == '"' {
            out.push('"');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if c.get(i + 1) == Some(&'\\') {
                let end = (i + 2..c.len())
                    .find(|&k| c[k] == '\'')
                    .unwrap_or(c.len() - 1);
                out.push_str("' '");
                i = end + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                out.push_str("' '");
                i += 3;
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_char_before(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|ch| ch.is_alphanumeric() || ch == '_')
}

fn parse_module(file: &Path, code: &str) -> Module {
    let mut module = Module {
        file: file.to_path_buf(),
        children: BTreeSet::new(),
        paths: Vec::new(),
        reexports: Vec::new(),
    };
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let tokens = tokenize(code);
    let text = |k: usize| tokens.get(k).map_or("", |t| t.1.as_str());
    // Brace depth, and the depths at which inline `mod name { ... }` blocks opened: paths in
    // them are written relative to the inline module (`super::` first leaves it).
    let (mut depth, mut inline): (usize, Vec<usize>) = (0, Vec::new());
    let mut k = 0;
    while k < tokens.len() {
        let (pos, tok) = (tokens[k].0, text(k));
        let prev = if k == 0 { "" } else { text(k - 1) };
        match tok {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            "mod" if is_ident(text(k + 1)) && text(k + 2) == ";" => {
                module.children.insert(text(k + 1).to_string());
            }
            "mod" if is_ident(text(k + 1)) && text(k + 2) == "{" => inline.push(depth),
            "use" if prev != "::" => {
                let public = prev == "pub" || prev == ")";
                let end = (k..tokens.len())
                    .find(|&e| text(e) == ";")
                    .unwrap_or(tokens.len());
                let words: Vec<&str> = (k + 1..end).map(text).collect();
                let mut items = Vec::new();
                use_tree(&words, &mut 0, &[], &mut items);
                for (path, alias) in items {
                    let path = relative_to_file(path, inline.len());
                    module.paths.push((line_of(pos), path.clone()));
                    if public && inline.is_empty() {
                        module.reexports.push((alias, path));
                    }
                }
                k = end + 1;
                continue;
            }
            // A path in code: `a::b::c` not itself preceded by `::`.
            t if is_ident(t) && prev != "::" && text(k + 1) == "::" => {
                let mut path = vec![t.to_string()];
                let mut j = k + 1;
                while text(j) == "::" && is_ident(text(j + 1)) {
                    path.push(text(j + 1).to_string());
                    j += 2;
                }
                module
                    .paths
                    .push((line_of(pos), relative_to_file(path, inline.len())));
                k = j;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    module
}

/// A path written inside `inline_depth` inline modules, rewritten relative to the file's
/// module: their `super::`s stay in the file (`self`); further ones leave it.
fn relative_to_file(mut path: Vec<String>, inline_depth: usize) -> Vec<String> {
    if inline_depth == 0 {
        return path;
    }
    let supers = path.iter().take_while(|s| *s == "super").count();
    if supers == 0 {
        return path;
    }
    let kept = supers.saturating_sub(inline_depth);
    path.drain(..supers - kept);
    if kept == 0 {
        path.insert(0, "self".to_string());
    }
    path
}

/// Identifiers, `::`, and single punctuation characters, with their byte offsets.
fn tokenize(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let bytes: Vec<(usize, char)> = code.char_indices().collect();
    let mut i = 0;
    while i < bytes.len() {
        let (pos, ch) = bytes[i];
        if ch.is_alphanumeric() || ch == '_' {
            let mut j = i;
            while j < bytes.len() && (bytes[j].1.is_alphanumeric() || bytes[j].1 == '_') {
                j += 1;
            }
            let end = bytes.get(j).map_or(code.len(), |b| b.0);
            out.push((pos, code[pos..end].to_string()));
            i = j;
        } else if ch == ':' && bytes.get(i + 1).map(|b| b.1) == Some(':') {
            out.push((pos, "::".to_string()));
            i += 2;
        } else if ch.is_whitespace() {
            i += 1;
        } else {
            out.push((pos, ch.to_string()));
            i += 1;
        }
    }
    out
}

/// Expands the `use` tree at `words[*i]` (`a::{b, c::d as e, self}`, `x::*`) under
/// `prefix` into (full path, name it binds here).
fn use_tree(
    words: &[&str],
    i: &mut usize,
    prefix: &[String],
    out: &mut Vec<(Vec<String>, String)>,
) {
    let mut path = prefix.to_vec();
    let mut first = true;
    loop {
        let word = words.get(*i).copied().unwrap_or("");
        match word {
            "::" if first => *i += 1, // `use ::std::...`
            "{" => {
                *i += 1;
                while !matches!(words.get(*i).copied(), Some("}") | None) {
                    use_tree(words, i, &path, out);
                    if words.get(*i) == Some(&",") {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            "*" => {
                *i += 1;
                out.push((path, "*".to_string()));
                return;
            }
            "self" if first && !prefix.is_empty() => {
                // `a::{self}`: `a` itself.
                *i += 1;
                let name = bound_name(words, i, &path);
                out.push((path, name));
                return;
            }
            w if is_ident(w) => {
                path.push(w.to_string());
                *i += 1;
                if words.get(*i) == Some(&"::") {
                    *i += 1;
                    first = false;
                    continue;
                }
                let name = bound_name(words, i, &path);
                out.push((path, name));
                return;
            }
            _ => return,
        }
        first = false;
    }
}

/// The name an import binds: its alias after `as`, else its last segment.
fn bound_name(words: &[&str], i: &mut usize, path: &[String]) -> String {
    if words.get(*i) == Some(&"as") {
        let alias = words.get(*i + 1).copied().unwrap_or("_").to_string();
        *i += 2;
        return alias;
    }
    path.last().cloned().unwrap_or_default()
}

// ---- resolving paths to modules --------------------------------------------------------

fn build_graph(modules: &BTreeMap<ModPath, Module>) -> ImportGraph {
    let resolver = Resolver { modules };
    let mut graph = ImportGraph::default();
    for (here, module) in modules {
        for (line, path) in &module.paths {
            let Some(target) = resolver.resolve(here, path, &mut HashSet::new()) else {
                continue;
            };
            // A submodule naming its own ancestor's items is containment, not an import: it is
            // how Rust splits one type's impl blocks over files (`shm/`: `impl ShmBackend` per
            // collective). Siblings, cousins and anything reached through `crate::` count.
            if here.starts_with(&target) {
                continue;
            }
            graph
                .edges
                .entry(name_of(here))
                .or_default()
                .entry(name_of(&target))
                .or_insert_with(|| format!("{}:{line}", module.file.display()));
        }
    }
    graph
}

struct Resolver<'a> {
    modules: &'a BTreeMap<ModPath, Module>,
}

impl Resolver<'_> {
    /// The module that defines what `path`, written in module `here`, names; `None` for
    /// other crates and std.
    fn resolve(
        &self,
        here: &ModPath,
        path: &[String],
        seen: &mut HashSet<(ModPath, String)>,
    ) -> Option<ModPath> {
        let first = path.first()?;
        let (mut cur, rest) = match first.as_str() {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (here.clone(), &path[1..]),
            "super" => {
                let mut base = here.clone();
                let mut n = 0;
                while path.get(n).map(String::as_str) == Some("super") {
                    base.pop();
                    n += 1;
                }
                (base, &path[n..])
            }
            name if self.modules[here].children.contains(name) => (here.clone(), path),
            _ => return None,
        };
        for seg in rest {
            let mut child = cur.clone();
            child.push(seg.clone());
            if self.modules.contains_key(&child) {
                cur = child;
                continue;
            }
            if let Some(target) = self.reexported(&cur, seg, seen) {
                return Some(target);
            }
            break;
        }
        Some(cur)
    }

    /// Where the item `name`, re-exported by module `m` (`pub use`), is defined.
    fn reexported(
        &self,
        m: &ModPath,
        name: &str,
        seen: &mut HashSet<(ModPath, String)>,
    ) -> Option<ModPath> {
        if !seen.insert((m.clone(), name.to_string())) {
            return None;
        }
        let reexports = &self.modules[m].reexports;
        if let Some((_, path)) = reexports.iter().find(|(alias, _)| alias == name) {
            return self.resolve(m, path, seen);
        }
        // `pub use x::*`: the name is (or is re-exported) in `x`.
        let (_, glob) = reexports.iter().find(|(alias, _)| alias == "*")?;
        let mut full = glob.clone();
        full.push(name.to_string());
        self.resolve(m, &full, seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `files` (relative path, text) under a fresh temp dir and returns it.
    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("module-graph-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        dir
    }

    fn cycle_of(dir: &Path) -> Option<Vec<String>> {
        let graphs = import_graphs(dir);
        let _ = std::fs::remove_dir_all(dir);
        graphs[0]
            .1
            .find_cycle()
            .map(|c| c.into_iter().map(|(edge, _)| edge).collect())
    }

    #[test]
    fn a_two_module_circle_is_found_with_where_it_is_made() {
        let dir = tree(
            "circle",
            &[
                ("lib.rs", "pub mod a;\npub mod b;\n"),
                ("a.rs", "use crate::b::Thing;\npub struct Other;\n"),
                (
                    "b.rs",
                    "pub struct Thing;\nfn f() { let _ = crate::a::Other; }\n",
                ),
            ],
        );
        let graphs = import_graphs(&dir);
        let cycle = graphs[0].1.find_cycle().expect("a -> b -> a");
        assert_eq!(cycle[0].0, "a -> b");
        assert!(cycle[0].1.ends_with("a.rs:1"), "{cycle:?}");
        assert_eq!(cycle[1].0, "b -> a");
        assert!(cycle[1].1.ends_with("b.rs:2"), "{cycle:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_longer_circle_through_super_and_groups_is_found() {
        let dir = tree(
            "super",
            &[
                ("lib.rs", "mod net;\nmod config;\n"),
                (
                    "net/mod.rs",
                    "mod wire;\nmod join;\nfn go() { join::run(); }\n",
                ),
                (
                    "net/join.rs",
                    "use super::{wire::{self, Frame}};\npub fn run() {}\n",
                ),
                (
                    "net/wire.rs",
                    "use crate::config::Settings;\npub struct Frame;\n",
                ),
                (
                    "config.rs",
                    "pub struct Settings { n: crate::net::Shared }\n",
                ),
            ],
        );
        // config -> net (mod.rs) -> join -> wire -> config
        let cycle = cycle_of(&dir).expect("a cycle");
        assert_eq!(cycle.len(), 4, "{cycle:?}");
        assert!(
            cycle.contains(&"net::wire -> config".to_string()),
            "{cycle:?}"
        );
    }

    #[test]
    fn facades_comments_strings_and_test_modules_make_no_cycle() {
        let dir = tree(
            "facade",
            &[
                (
                    "lib.rs",
                    "pub mod a;\npub mod b;\npub use a::Alpha;\npub use b::{Beta as B};\n",
                ),
                // `crate::Beta`-style names go to the defining module, not to lib.rs.
                ("a.rs", "use crate::B;\npub struct Alpha(B);\n"),
                (
                    "b.rs",
                    "// crate::a::Alpha in a comment\n\
                     /* crate::a::x */\n\
                     pub struct Beta;\n\
                     const S: &str = \"crate::a::Alpha\";\n\
                     const C: char = '\"';\n\
                     fn f<'a>(x: &'a str) -> &'a str { x }\n\
                     #[cfg(test)]\nmod tests { use super::*; }\n",
                ),
            ],
        );
        assert_eq!(cycle_of(&dir), None);
    }

    #[test]
    fn a_child_using_its_parent_is_containment_but_siblings_through_the_parent_count() {
        // The child names an item defined in its parent while the parent uses the child.
        let contained = tree(
            "parent-real",
            &[
                ("lib.rs", "mod p;\n"),
                (
                    "p/mod.rs",
                    "mod c;\npub struct Defined;\nfn g() { c::f(); }\n",
                ),
                ("p/c.rs", "use super::Defined;\npub fn f() {}\n"),
            ],
        );
        assert_eq!(cycle_of(&contained), None);
        // Through the parent's re-export to a sibling that uses the first child: a cycle.
        let siblings = tree(
            "parent-facade",
            &[
                ("lib.rs", "mod p;\n"),
                ("p/mod.rs", "mod c;\nmod d;\npub use d::Defined;\n"),
                ("p/c.rs", "use super::Defined;\npub fn f() {}\n"),
                ("p/d.rs", "pub struct Defined;\nfn g() { super::c::f(); }\n"),
            ],
        );
        let mut cycle = cycle_of(&siblings).expect("p::c <-> p::d");
        cycle.sort();
        assert_eq!(cycle, ["p::c -> p::d", "p::d -> p::c"]);
    }

    #[test]
    #[should_panic(expected = "import cycle among the modules")]
    fn assert_acyclic_panics_on_a_cycle() {
        let dir = tree(
            "assert",
            &[
                ("main.rs", "mod a;\nmod b;\n"),
                ("a.rs", "use crate::b::X;\npub struct Y;\n"),
                ("b.rs", "use crate::a::Y;\npub struct X;\n"),
            ],
        );
        assert_acyclic(&dir);
    }
}
