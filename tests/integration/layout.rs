//! The house: the module graph of `src/` (files as nodes, `use crate::` /
//! `super::` imports and `crate::` paths as edges) has no import circle
//! larger than two files, and none at all through the claim decision, the
//! store, the inventory or the journal; and `src/lib.rs`'s `# Layout` names
//! exactly the modules the crate declares.
//!
//! Test modules (`#[cfg(test)]` to the end of a file) and comments are not
//! part of the graph.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Module path (`["store", "cluster"]`) → file, for every source file.
type Modules = BTreeMap<Vec<String>, PathBuf>;

fn module_of(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    match stem {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => return None,
        "mod" => {}
        _ => parts.push(stem.to_owned()),
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its test module.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Expands a `use` tree (`crate::{a::{B, C}, d}`) into full paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &[char], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path: Vec<String> = prefix.to_vec();
        let mut word = String::new();
        while *i < s.len() {
            let c = s[*i];
            match c {
                '{' => {
                    *i += 1;
                    if !word.is_empty() {
                        path.push(std::mem::take(&mut word));
                    }
                    loop {
                        parse(s, i, &path, out);
                        if *i < s.len() && s[*i] == ',' {
                            *i += 1;
                            continue;
                        }
                        break;
                    }
                    if *i < s.len() && s[*i] == '}' {
                        *i += 1;
                    }
                    return;
                }
                ',' | '}' => break,
                ':' => {
                    if !word.is_empty() {
                        path.push(std::mem::take(&mut word));
                    }
                    *i += 1;
                }
                c if c.is_whitespace() => {
                    // `x as y`: the rest of this item is the alias.
                    let rest: String = s[*i..].iter().take(4).collect();
                    if rest.trim_start().starts_with("as ") {
                        while *i < s.len() && s[*i] != ',' && s[*i] != '}' {
                            *i += 1;
                        }
                        break;
                    }
                    *i += 1;
                }
                c => {
                    word.push(c);
                    *i += 1;
                }
            }
        }
        // `a::{b, self}`: `self` names the prefix; an empty item (after a
        // trailing comma) names nothing.
        if word == "self" || word == "*" {
            out.push(path);
        } else if !word.is_empty() {
            path.push(word);
            out.push(path);
        } else if path.len() > prefix.len() {
            out.push(path);
        }
    }
    let chars: Vec<char> = tree.chars().collect();
    let mut out = Vec::new();
    parse(&chars, &mut 0, &[], &mut out);
    out
}

/// The child modules a file declares (`mod x;`, `pub mod x;`).
fn child_modules(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("pub ").or(l.strip_prefix("pub(crate) ")).unwrap_or(l);
            rest.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

/// Every path this code refers to that starts at `crate`, `super` or
/// `self`, or at one of its own child modules (`record::decode`).
fn referenced_paths(code: &str) -> Vec<Vec<String>> {
    let children = child_modules(code);
    let mut paths = Vec::new();
    // `use` statements, whole trees.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        let tree = after[..end].trim();
        if ["crate::", "super::", "self::"].iter().any(|p| tree.starts_with(p)) {
            paths.extend(expand(tree));
        } else if children.iter().any(|c| tree.starts_with(&format!("{c}::"))) {
            paths.extend(expand(&format!("self::{tree}")));
        }
    }
    // Paths into its own children: `record::encode(..)`.
    for child in &children {
        let needle = format!("{child}::");
        let mut rest = code;
        while let Some(at) = rest.find(&needle) {
            let before = rest[..at].chars().last();
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                paths.push(vec!["self".to_owned(), child.clone()]);
            }
            rest = &rest[at + needle.len()..];
        }
    }
    // Paths written inline: `crate::clock::now_ms()`.
    for root in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(root) {
            let before = rest[..at].chars().last();
            rest = &rest[at..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            // `crate::a::{..}` is a use tree, read whole above.
            let tree = rest[end..].starts_with('{');
            if !tree && !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                paths.push(
                    rest[..end]
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                );
            }
            rest = &rest[end.max(1)..];
        }
    }
    paths
}

/// Resolves a referenced path to the file of the deepest module it names.
fn resolve(modules: &Modules, from: &[String], path: &[String]) -> Option<PathBuf> {
    let mut base: Vec<String> = Vec::new();
    let mut segs = path.iter().peekable();
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
        }
        Some("self") | Some("super") => {
            // `self` is the module itself; each `super` goes one module up.
            base = from.to_vec();
            while let Some(s) = segs.peek() {
                match s.as_str() {
                    "self" => {}
                    "super" => {
                        base.pop();
                    }
                    _ => break,
                }
                segs.next();
            }
        }
        _ => return None,
    }
    let mut current = base;
    let mut best = modules.get(&current).cloned();
    for s in segs {
        current.push(s.clone());
        match modules.get(&current) {
            Some(file) => best = Some(file.clone()),
            None => break,
        }
    }
    best
}

/// The import graph of the source tree under `src`.
fn graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: Modules = files
        .iter()
        .filter_map(|f| module_of(src, f).map(|m| (m, f.clone())))
        .collect();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = code_of(&std::fs::read_to_string(file).expect("read source"));
        let targets = edges.entry(file.clone()).or_default();
        for path in referenced_paths(&code) {
            if let Some(target) = resolve(&modules, module, &path) {
                if &target != file {
                    targets.insert(target);
                }
            }
        }
    }
    edges
}

/// Strongly connected components with more than one file (Tarjan).
fn circles(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct T<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        next: usize,
        out: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a PathBuf) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(targets) = t.edges.get(v) {
            for w in targets {
                let Some((w, _)) = t.edges.get_key_value(w) else {
                    continue;
                };
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.clone());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// What is wrong with the house under `src`, one sentence per problem.
fn house_problems(src: &Path) -> Vec<String> {
    let core = ["claim.rs", "store/", "inventory/", "journal/"];
    let mut problems = Vec::new();
    for circle in circles(&graph(src)) {
        let names: Vec<String> = circle
            .iter()
            .map(|f| f.strip_prefix(src).unwrap_or(f).display().to_string())
            .collect();
        if names.len() > 2 {
            problems.push(format!(
                "an import circle of {} files: {}",
                names.len(),
                names.join(" -> ")
            ));
        } else if names.iter().any(|n| core.iter().any(|c| n.starts_with(c))) {
            problems.push(format!(
                "an import circle through the claim core: {}",
                names.join(" <-> ")
            ));
        }
    }
    problems
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn nothing_imports_the_crate_root() {
    let edges = graph(&src());
    let root = src().join("lib.rs");
    let importers: Vec<_> = edges
        .iter()
        .filter(|(_, t)| t.contains(&root))
        .map(|(f, _)| f)
        .collect();
    assert!(importers.is_empty(), "{importers:?} import lib.rs");
}

#[test]
fn the_module_graph_has_no_import_circle() {
    let problems = house_problems(&src());
    assert!(
        problems.is_empty(),
        "the module graph has circles:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_circle_check_finds_a_reintroduced_circle() {
    // A copy of the real tree with one import added back the wrong way:
    // the store asking the claim decision for something.
    let copy = tempfile::tempdir().unwrap();
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy_dir(&path, &target);
            } else {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    copy_dir(&src(), copy.path());
    assert!(house_problems(copy.path()).is_empty());
    let store = copy.path().join("store/mod.rs");
    let text = std::fs::read_to_string(&store).unwrap();
    std::fs::write(&store, format!("use crate::claim::Claimer;\n{text}")).unwrap();
    let problems = house_problems(copy.path());
    assert!(
        problems
            .iter()
            .any(|p| p.contains("store/mod.rs") && p.contains("claim.rs")),
        "{problems:?}"
    );
    // And a two-file circle through the journal counts too.
    let journal = copy.path().join("journal/record.rs");
    let text = std::fs::read_to_string(&journal).unwrap();
    std::fs::write(&journal, format!("use super::Journal;\n{text}")).unwrap();
    let problems = house_problems(copy.path());
    assert!(problems.iter().any(|p| p.contains("journal/record.rs")), "{problems:?}");
}

#[test]
fn use_trees_expand_to_every_path() {
    let paths = expand("crate::{a::{B, c::D}, e, f::{self, G as H}}");
    let shown: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        shown,
        ["crate::a::B", "crate::a::c::D", "crate::e", "crate::f", "crate::f::G"]
    );
}

/// The modules `lib.rs`'s `# Layout` names, in its order.
fn layout_order() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let layout = lib.split("//! # Layout").nth(1).expect("lib.rs has a # Layout section");
    layout
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| l.trim_start_matches("//!").trim().strip_prefix("- [`"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_module_imports_only_modules_listed_before_it() {
    let order = layout_order();
    let top = |file: &Path| -> Option<String> {
        let m = module_of(&src(), file)?;
        m.first().cloned()
    };
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut wrong = Vec::new();
    for (file, targets) in graph(&src()) {
        let Some(from) = top(&file) else { continue };
        for target in targets {
            let Some(to) = top(&target) else { continue };
            if from != to && rank(&to) >= rank(&from) {
                wrong.push(format!("{from} imports {to}, which # Layout lists after it"));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_layout_in_lib_rs_names_every_module_and_only_those() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ").and_then(|m| m.strip_suffix(';')))
        .map(str::to_owned)
        .collect();
    let layout = lib.split("//! # Layout").nth(1).expect("lib.rs has a # Layout section");
    let named: BTreeSet<String> = layout
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| l.trim_start_matches("//!").trim().strip_prefix("- [`"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(named, declared, "lib.rs's # Layout and its `pub mod` lines differ");
    for m in &declared {
        let file = src().join(format!("{m}.rs"));
        let dir = src().join(m).join("mod.rs");
        assert!(file.exists() || dir.exists(), "module {m} has no file");
    }
}
