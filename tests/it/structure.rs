//! The shape of `src/`, checked so that it stays a house a newcomer can find their way in:
//!
//! - no function or method is over [`FN_LINES_MAX`] lines (from `fn` to its closing brace;
//!   `#[test]` functions and anything under `#[cfg(test)]` don't count);
//! - no file is over [`FILE_LINES_MAX`] lines, not counting its `#[cfg(test)]` items (and
//!   not counting at all a file that is a `#[cfg(test)] mod x;`);
//! - the pure modules ([`PURE`]: `route`, `group`, `topic`, `transform`, `model`, `commerceml`, as files or folders)
//!   use nothing of the modules that do I/O ([`IO`]): no `use crate::broker::…`, no
//!   `crate::store::…` path in code (macro arguments included), nor the same reached through
//!   `super::`. This holds for their tests too.
//!
//! Why: a function longer than a screenful or two hides its steps (split it into named
//! ones); a file past the limit holds more than one concern (split the module); and what
//! routes and reshapes changes stays plain functions over data, testable without RabbitMQ,
//! Redis or SQLite (ARCHITECTURE.md: "`route` is pure", "`transform` is pure").
//!
//! The source is read with `syn`, for line numbers that comments and strings can't fool.
//! `src_keeps_to_its_limits` checks the real `src/`; `tests_are_modules_of_the_two_test_binaries`
//! that no `tests/*.rs` adds a test binary beside `it` and `serial`; the other tests check
//! the checker on small sources written here.

use proc_macro2::{TokenStream, TokenTree};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use syn::spanned::Spanned;
use syn::visit::Visit;

/// The most lines a function or method may have.
const FN_LINES_MAX: usize = 120;
/// The most lines a file may have, its `#[cfg(test)]` items not counted.
const FILE_LINES_MAX: usize = 900;
/// Modules that are plain functions over data.
const PURE: [&str; 6] = [
    "route",
    "group",
    "topic",
    "transform",
    "model",
    "commerceml",
];
/// Modules that do I/O (or assemble those that do): the pure modules must not use them.
const IO: [&str; 9] = [
    "ingress", "deliver", "broker", "store", "admin", "embedded", "sqlite", "app", "cli",
];

/// One file of `src/`: its path from the package root (`src/transform/rules.rs`) and text.
struct Source {
    path: String,
    text: String,
}

#[test]
fn src_keeps_to_its_limits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(!files.is_empty(), "no .rs file under {}", root.display());
    let sources: Vec<Source> = files
        .iter()
        .map(|file| Source {
            path: file
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/"),
            text: std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display())),
        })
        .collect();
    let problems = check(&sources);
    assert!(
        problems.is_empty(),
        "src/ breaks its structure rules in {} place(s) (the rules, and why, are at the top \
         of tests/it/structure.rs: functions at most {FN_LINES_MAX} lines, files at most \
         {FILE_LINES_MAX} lines without their #[cfg(test)] items, {} use nothing of {}):\n  {}\n",
        problems.len(),
        PURE.join(", "),
        IO.join(", "),
        problems.join("\n  ")
    );
}

/// Every test is a module of one of the two test binaries (`tests/it`, `tests/serial`):
/// a `tests/*.rs` file would be one more binary compiling the whole harness again.
#[test]
fn tests_are_modules_of_the_two_test_binaries() {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut stray: Vec<String> = std::fs::read_dir(&tests)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| path.display().to_string())
        .collect();
    stray.sort();
    assert!(
        stray.is_empty(),
        "each of these is a test binary of its own; make it a module of tests/it/main.rs \
         (or tests/serial/main.rs if it must not run beside other tests): {stray:?}"
    );
}

/// Every test of the serial binary takes [`TURN`](../serial/main.rs) first, so that no two
/// of them run at once without `--test-threads=1`.
#[test]
fn serial_tests_take_their_turn() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serial");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let mut tests = 0;
    let mut late = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", file.display()));
        for item in &parsed.items {
            let syn::Item::Fn(f) = item else { continue };
            if !test_fn(&f.attrs) {
                continue;
            }
            tests += 1;
            let first = f.block.stmts.first().map(|stmt| {
                let span = stmt.span();
                lines[span.start().line - 1..span.end().line].join(" ")
            });
            if !first.is_some_and(|s| s.contains("TURN.") && s.contains("lock")) {
                late.push(format!("{}: {}", file.display(), f.sig.ident));
            }
        }
    }
    assert!(tests > 0, "no test found under {}", dir.display());
    assert!(
        late.is_empty(),
        "these serial tests don't start with `let _turn = TURN.lock().await;` (or \
         `TURN.blocking_lock()`), so they may run beside another: {late:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// The checker

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A broken rule: file, line (0 for the whole file) and the sentence to print.
type Problem = (String, usize, String);

/// Every broken rule in `sources`, one line each (`file:line: what`), by file and line.
fn check(sources: &[Source]) -> Vec<String> {
    let mut problems: BTreeSet<Problem> = BTreeSet::new();
    let mut parsed = Vec::new();
    for source in sources {
        match syn::parse_file(&source.text) {
            Ok(file) => parsed.push((source, file)),
            Err(e) => {
                let line = e.span().start().line;
                let text = format!("{}:{line}: does not parse as Rust: {e}", source.path);
                problems.insert((source.path.clone(), line, text));
            }
        }
    }
    let test_files = test_module_files(&parsed);
    for (source, file) in &parsed {
        let is_test_file = test_files
            .iter()
            .any(|t| source.path == *t || source.path.starts_with(&format!("{t}/")));
        let mut visitor = Checker {
            path: &source.path,
            module: module_path(&source.path),
            pure: pure_module(&source.path),
            in_test: is_test_file,
            types: Vec::new(),
            test_lines: HashSet::new(),
            problems: &mut problems,
        };
        visitor.visit_file(file);
        let test_lines = visitor.test_lines;
        if !is_test_file {
            let lines = source.text.lines().count();
            let counted = (1..=lines).filter(|l| !test_lines.contains(l)).count();
            if counted > FILE_LINES_MAX {
                let text = format!(
                    "{}: {counted} lines without its #[cfg(test)] items (at most {FILE_LINES_MAX})",
                    source.path
                );
                problems.insert((source.path.clone(), 0, text));
            }
        }
    }
    problems.into_iter().map(|(_, _, text)| text).collect()
}

/// The pure module a file belongs to, if any: `src/transform/rules.rs` → `transform`.
fn pure_module(path: &str) -> Option<&'static str> {
    PURE.into_iter()
        .find(|m| path == format!("src/{m}.rs") || path.starts_with(&format!("src/{m}/")))
}

/// The module path of a library file: `src/transform/rules.rs` → `[transform, rules]`,
/// `src/broker/mod.rs` → `[broker]`, `src/lib.rs` → `[]`. Binaries' files get their path
/// under `src/` (they are other crates; the pure-module rule doesn't look at them).
fn module_path(path: &str) -> Vec<String> {
    let inner = path.strip_prefix("src/").unwrap_or(path);
    let inner = inner.strip_suffix(".rs").unwrap_or(inner);
    let mut parts: Vec<String> = inner.split('/').map(str::to_string).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The files that are `#[cfg(test)] mod name;` of another file (without `.rs`, so that a
/// folder of the same name, holding its submodules, is known too): `src/deliver/tests`.
fn test_module_files(parsed: &[(&Source, syn::File)]) -> Vec<String> {
    let mut found = Vec::new();
    for (source, file) in parsed {
        let path = Path::new(&source.path);
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let parent = path.parent().unwrap_or(Path::new(""));
        let crate_root = source.path == "src/lib.rs"
            || source.path == "src/main.rs"
            || parent == Path::new("src/bin");
        let children = if crate_root || name == "mod" || name == "main" {
            parent.to_path_buf()
        } else {
            parent.join(&*name)
        };
        for item in &file.items {
            let syn::Item::Mod(m) = item else { continue };
            if m.content.is_some() || !cfg_test(&m.attrs) {
                continue;
            }
            let target = match path_attr(&m.attrs) {
                Some(p) => parent.join(p),
                None => {
                    let flat = children.join(format!("{}.rs", m.ident));
                    if parsed.iter().any(|(s, _)| Path::new(&s.path) == flat) {
                        flat
                    } else {
                        children.join(m.ident.to_string()).join("mod.rs")
                    }
                }
            };
            let target = target.to_string_lossy().replace('\\', "/");
            found.push(target.clone());
            if let Some(stem) = target.strip_suffix("/mod.rs") {
                found.push(stem.to_string());
            } else if let Some(stem) = target.strip_suffix(".rs") {
                found.push(stem.to_string());
            }
        }
    }
    found
}

/// `#[path = "…"]`'s value.
fn path_attr(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

/// Whether the attributes make an item exist only in test builds: `#[cfg(test)]`, or
/// `#[cfg(all(test, …))]`.
fn cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|meta| predicate_needs_test(&meta))
    })
}

/// Whether a `cfg` predicate can only hold in a test build.
fn predicate_needs_test(meta: &syn::Meta) -> bool {
    match meta {
        syn::Meta::Path(p) => p.is_ident("test"),
        syn::Meta::List(list) => {
            let parts = list.parse_args_with(
                syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
            );
            let Ok(parts) = parts else { return false };
            if list.path.is_ident("all") {
                parts.iter().any(predicate_needs_test)
            } else if list.path.is_ident("any") {
                !parts.is_empty() && parts.iter().all(predicate_needs_test)
            } else {
                false
            }
        }
        syn::Meta::NameValue(_) => false,
    }
}

/// `#[test]`, `#[tokio::test]` and the like.
fn test_fn(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path()
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "test")
    })
}

/// The checks of one file, as a syntax tree visitor.
struct Checker<'a> {
    path: &'a str,
    /// The module the visitor is in (inline `mod x { … }` blocks pushed on it).
    module: Vec<String>,
    /// The pure module the file belongs to, if any.
    pure: Option<&'static str>,
    /// Inside a `#[cfg(test)]` item, a test function or a test file.
    in_test: bool,
    /// The `impl` blocks' type names around the visitor, to name methods.
    types: Vec<String>,
    /// Lines of the file within `#[cfg(test)]` items.
    test_lines: HashSet<usize>,
    problems: &'a mut BTreeSet<Problem>,
}

impl Checker<'_> {
    fn function(&mut self, name: String, sig: &syn::Signature, block: &syn::Block) {
        if self.in_test {
            return;
        }
        let start = sig.fn_token.span.start().line;
        let end = block.brace_token.span.close().end().line;
        let lines = end + 1 - start;
        if lines > FN_LINES_MAX {
            let text = format!(
                "{}:{start}: fn `{name}` is {lines} lines (at most {FN_LINES_MAX})",
                self.path
            );
            self.problems.insert((self.path.to_string(), start, text));
        }
    }

    fn qualified(&self, ident: &syn::Ident) -> String {
        match self.types.last() {
            Some(t) => format!("{t}::{ident}"),
            None => ident.to_string(),
        }
    }

    /// Runs `visit` inside an item, noting when the item exists only in tests.
    fn item(
        &mut self,
        attrs: &[syn::Attribute],
        span_of: proc_macro2::Span,
        visit: impl FnOnce(&mut Self),
    ) {
        let test = cfg_test(attrs);
        if test {
            let start = attrs
                .iter()
                .map(|a| a.span().start().line)
                .chain([span_of.start().line])
                .min()
                .unwrap_or(0);
            self.test_lines.extend(start..=span_of.end().line);
        }
        let was = self.in_test;
        self.in_test |= test;
        visit(self);
        self.in_test = was;
    }

    /// A path written in the file (`use` tree flattened), at `line`: a problem if the file
    /// is of a pure module and the path leads into an I/O module.
    fn uses(&mut self, segments: &[String], line: usize) {
        let Some(pure) = self.pure else { return };
        let mut target: Vec<String> = match segments.first().map(String::as_str) {
            Some("crate") => Vec::new(),
            Some("self") => self.module.clone(),
            Some("super") => self.module.clone(),
            _ => return,
        };
        let mut rest = &segments[1..];
        if segments[0] == "super" {
            target.pop();
            while rest.first().is_some_and(|s| s == "super") {
                target.pop();
                rest = &rest[1..];
            }
        }
        target.extend(rest.iter().cloned());
        let Some(first) = target.first() else { return };
        if first == "*" || IO.contains(&first.as_str()) {
            let text = format!(
                "{}:{line}: {pure} uses crate::{}, of a module that does I/O",
                self.path,
                target.join("::"),
            );
            self.problems.insert((self.path.to_string(), line, text));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let line = n.ident.span().start().line;
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.uses(&full, line);
            }
            syn::UseTree::Rename(r) => {
                let line = r.ident.span().start().line;
                let mut full = prefix.clone();
                if r.ident != "self" {
                    full.push(r.ident.to_string());
                }
                self.uses(&full, line);
            }
            syn::UseTree::Glob(g) => {
                let mut full = prefix.clone();
                full.push("*".into());
                self.uses(&full, g.star_token.span().start().line);
            }
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }

    /// Paths like `crate::store::X` in a macro's tokens (`format!`, `matches!`, …), which
    /// the syntax tree leaves unparsed.
    fn macro_tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            if let TokenTree::Group(g) = &tokens[i] {
                self.macro_tokens(g.stream());
                i += 1;
                continue;
            }
            let starts =
                matches!(&tokens[i], TokenTree::Ident(id) if id == "crate" || id == "super");
            if !starts {
                i += 1;
                continue;
            }
            let line = tokens[i].span().start().line;
            let mut segments = vec![tokens[i].to_string()];
            let mut j = i + 1;
            // `::` is two `:` puncts, then the next segment.
            while let (
                Some(TokenTree::Punct(a)),
                Some(TokenTree::Punct(b)),
                Some(TokenTree::Ident(id)),
            ) = (tokens.get(j), tokens.get(j + 1), tokens.get(j + 2))
            {
                if a.as_char() != ':' || b.as_char() != ':' {
                    break;
                }
                segments.push(id.to_string());
                j += 3;
            }
            if segments.len() > 1 {
                self.uses(&segments, line);
            }
            i = j;
        }
    }
}

impl<'ast> Visit<'ast> for Checker<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::ExternCrate(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::ForeignMod(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Macro(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::TraitAlias(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Union(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            _ => &[],
        };
        self.item(attrs, item.span(), |v| syn::visit::visit_item(v, item));
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.module.push(m.ident.to_string());
        syn::visit::visit_item_mod(self, m);
        self.module.pop();
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let name = match &*i.self_ty {
            syn::Type::Path(p) => p
                .path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .unwrap_or_default(),
            _ => "_".into(),
        };
        self.types.push(name);
        syn::visit::visit_item_impl(self, i);
        self.types.pop();
    }

    fn visit_item_trait(&mut self, t: &'ast syn::ItemTrait) {
        self.types.push(t.ident.to_string());
        syn::visit::visit_item_trait(self, t);
        self.types.pop();
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        let was = self.in_test;
        self.in_test |= test_fn(&f.attrs);
        self.function(f.sig.ident.to_string(), &f.sig, &f.block);
        syn::visit::visit_item_fn(self, f);
        self.in_test = was;
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.item(&f.attrs, f.span(), |v| {
            v.in_test |= test_fn(&f.attrs);
            v.function(v.qualified(&f.sig.ident), &f.sig, &f.block);
            syn::visit::visit_impl_item_fn(v, f);
        });
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        self.item(&f.attrs, f.span(), |v| {
            if let Some(block) = &f.default {
                v.function(v.qualified(&f.sig.ident), &f.sig, block);
            }
            syn::visit::visit_trait_item_fn(v, f);
        });
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut prefix = Vec::new();
        if u.leading_colon.is_none() {
            self.use_tree(&mut prefix, &u.tree);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.leading_colon.is_none() {
            let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
            if segments.len() > 1 {
                let line = path.segments[0].ident.span().start().line;
                self.uses(&segments, line);
            }
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.macro_tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

// ---------------------------------------------------------------------------------------
// The checker checked

fn source(path: &str, text: &str) -> Source {
    Source {
        path: path.into(),
        text: text.into(),
    }
}

/// A function of `body_lines` statements: `body_lines + 2` lines in all.
fn function(name: &str, body_lines: usize) -> String {
    format!(
        "fn {name}() {{\n{}}}\n",
        "    let _x = 1;\n".repeat(body_lines)
    )
}

#[test]
fn checker_finds_long_functions_but_not_tests() {
    let text = format!(
        "//! A module.\n\n{}\n{}\nstruct S;\n\nimpl S {{\n    {}}}\n\n#[test]\n{}\n\
         #[cfg(test)]\nmod tests {{\n{}}}\n",
        function("short", FN_LINES_MAX - 2),
        function("long", FN_LINES_MAX - 1),
        function("method", FN_LINES_MAX + 10),
        function("long_test", 200),
        function("helper_in_tests", 200),
    );
    let problems = check(&[source("src/ingress/accept.rs", &text)]);
    let line_of = |what: &str| text.lines().position(|l| l.contains(what)).unwrap() + 1;
    assert_eq!(
        problems,
        [
            format!(
                "src/ingress/accept.rs:{}: fn `long` is {} lines (at most {FN_LINES_MAX})",
                line_of("fn long("),
                FN_LINES_MAX + 1
            ),
            format!(
                "src/ingress/accept.rs:{}: fn `S::method` is {} lines (at most {FN_LINES_MAX})",
                line_of("fn method("),
                FN_LINES_MAX + 12
            ),
        ],
        "{text}"
    );
}

#[test]
fn checker_finds_long_files_without_counting_tests() {
    let body = "const A: u8 = 1;\n".repeat(FILE_LINES_MAX - 50);
    let tests = format!(
        "#[cfg(test)]\nmod tests {{\n{}}}\n",
        "    // a test\n".repeat(200)
    );
    let fits = format!("{body}{tests}");
    assert_eq!(check(&[source("src/app.rs", &fits)]), Vec::<String>::new());

    let too_long = format!("{body}{}{tests}", "const B: u8 = 2;\n".repeat(51));
    assert_eq!(
        check(&[source("src/app.rs", &too_long)]),
        [format!(
            "src/app.rs: {} lines without its #[cfg(test)] items (at most {FILE_LINES_MAX})",
            FILE_LINES_MAX + 1
        )]
    );

    // A file that is a `#[cfg(test)] mod tests;` of another is not counted at all.
    let parent = "#[cfg(test)]\nmod tests;\n";
    let long_tests = "fn t() {}\n".repeat(FILE_LINES_MAX + 1);
    let files = [
        source("src/app.rs", parent),
        source("src/app/tests.rs", &long_tests),
    ];
    assert_eq!(check(&files), Vec::<String>::new());
}

#[test]
fn checker_finds_pure_modules_using_io_modules() {
    let text = r#"//! Pure.
use crate::config::Config;
use crate::model::{Change, Op};
use crate::{model::Envelope, store::Remap};
use super::super::broker as b;

fn f() -> String {
    let _ = crate::deliver::Core::new();
    format!("{}", crate::app::NAME)
}

#[cfg(test)]
mod tests {
    use super::super::rules::Rule;
    use super::super::super::admin::X;
}
"#;
    let problems = check(&[source("src/transform/rules.rs", text)]);
    let tail = "of a module that does I/O";
    assert_eq!(
        problems,
        [
            format!("src/transform/rules.rs:4: transform uses crate::store::Remap, {tail}"),
            format!("src/transform/rules.rs:5: transform uses crate::broker, {tail}"),
            format!("src/transform/rules.rs:8: transform uses crate::deliver::Core::new, {tail}"),
            format!("src/transform/rules.rs:9: transform uses crate::app::NAME, {tail}"),
            format!("src/transform/rules.rs:15: transform uses crate::admin::X, {tail}"),
        ]
    );
    // The same source in a module that may do I/O breaks nothing.
    assert_eq!(
        check(&[source("src/deliver/shape.rs", text)]),
        Vec::<String>::new()
    );
    // Nor does a source that doesn't parse go unnoticed.
    let broken = check(&[source("src/route.rs", "fn f( {")]);
    assert!(
        broken.len() == 1 && broken[0].starts_with("src/route.rs:1: does not parse as Rust"),
        "{broken:?}"
    );
}
