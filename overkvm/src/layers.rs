//! The library's structure, checked: layers only point down (no import cycle between
//! top-level modules), clap stays in the binary, and one module drives the sampler. A change
//! that breaks one of these fails here, with the modules involved named.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Every `.rs` file of each library module (`foo.rs` or `foo/`): not the crate roots, not the
/// binary's `cli.rs`, not this check.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(src).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            let mut files = Vec::new();
            let mut todo = vec![path];
            while let Some(dir) = todo.pop() {
                for e in fs::read_dir(dir).unwrap().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        todo.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        files.push(p);
                    }
                }
            }
            out.insert(name, files);
        } else if let Some(stem) = name.strip_suffix(".rs")
            && !["lib", "main", "cli", "layers"].contains(&stem)
        {
            out.insert(stem.to_string(), vec![path]);
        }
    }
    out
}

/// The code of a file without its `#[cfg(test)] mod tests` (tests may reach anywhere).
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Top-level modules named after `crate::`, alone or in a `use crate::{...}` group.
fn references(text: &str, known: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::X, b, c::{..}}`: the first identifier of each top-level item.
            let (mut depth, mut start) = (0usize, true);
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| known.contains(m.as_str()));
    out
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        for w in t.edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.stack.contains(&w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = BTreeSet::new();
            while let Some(w) = t.stack.pop() {
                comp.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.found.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.found
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let mods = modules(&src());
    let known: BTreeSet<&str> = mods.keys().map(String::as_str).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, files) in &mods {
        let e = edges.entry(m.clone()).or_default();
        for f in files {
            e.extend(references(&code(f), &known).into_iter().filter(|t| t != m));
        }
    }
    let found = cycles(&edges);
    let explain: Vec<String> = found
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| format!("{m} -> {:?}", edges[m].intersection(c).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert!(found.is_empty(), "import cycles: {explain:#?}");
    assert!(mods.len() > 10, "found only {:?}", mods.keys());
}

#[test]
fn the_library_does_not_know_the_command_line() {
    for files in modules(&src()).values() {
        for f in files {
            let text = code(f);
            assert!(
                !text.contains("clap::") && !text.contains("use clap"),
                "{} uses clap: the binary's cli.rs maps the command line onto option structs",
                f.display()
            );
        }
    }
}

/// A service never imports a command's module: the throttle (run by `serve`) does not reach
/// into the VM lifecycle (`vm ...`); what it needs of overkvm's own VMs is handed to it
/// (`qemu::qmp::OwnVms`).
#[test]
fn services_do_not_import_commands() {
    let mods = modules(&src());
    let known: BTreeSet<&str> = mods.keys().map(String::as_str).collect();
    for (service, command) in [("throttle", "lifecycle")] {
        for f in &mods[service] {
            assert!(
                !references(&code(f), &known).contains(command),
                "{} imports {command}",
                f.display()
            );
        }
    }
}

#[test]
fn one_module_drives_the_sampler() {
    let drivers: Vec<String> = modules(&src())
        .values()
        .flatten()
        .filter(|f| {
            let text = code(f);
            text.contains("Sampler::new") || text.contains("sample::Sampler")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        drivers.len() == 1 && drivers[0].ends_with("pipeline.rs"),
        "{drivers:?}"
    );
}

#[test]
fn references_are_read_from_paths_and_groups() {
    let known: BTreeSet<&str> = ["a", "b", "c", "d"].into();
    let r = references(
        "use crate::{a::X, b, c::{Y, d::Z}};\nfn f() { crate::d::g(); crate::zz::h() }",
        &known,
    );
    assert_eq!(r, ["a", "b", "c", "d"].map(String::from).into());
    let mut edges = BTreeMap::new();
    edges.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    edges.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    edges.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycles(&edges),
        [BTreeSet::from(["a".to_string(), "b".to_string()])]
    );
}
