//! The documentation's examples work: every config in it validates and every `lxbridge …`
//! command in it parses. Read: `README.md`, every `docs/**/*.md`, `clients/1c/README.md`.
//! (The files in `config/` are checked elsewhere: `cli::validate_accepts_the_example_configs`
//! and, in tests/serial, `cluster::the_cluster_example_config_validates_with_its_certificates_in_place`.)
//!
//! The convention for fenced blocks, which whoever writes docs follows:
//!
//! - ```` ```toml ````: a whole lxbridge config. It must parse and validate
//!   (`Config::parse`, then `Config::validate` finds nothing). Relative paths in it
//!   (`mapping_file`, `script_file`, TLS files) start at the repository root.
//! - ```` ```toml fragment ````: part of a config, merged into [`BASE`] (no backend section,
//!   so the embedded backend; a node `ut`, a 1C base with a token that publishes; a node
//!   `site`, a push target with a deliver url), then checked as a whole config. The merge
//!   is of TOML values: a top-level table is merged key by key, the fragment's value
//!   winning (`[server]` in a fragment keeps the base's other `[server]` keys);
//!   `[[node]]`, `[[route]]` and `[[group]]` entries are appended, except that a fragment
//!   `[[node]]` whose `name` is a base node's (`ut`, `site`) replaces it; any other
//!   top-level key is the fragment's.
//! - any other info string with `toml` in it (`TOML`, `toml-fragment`, …) fails, so that a
//!   typo cannot hide a block from these checks. TOML that is not a config (a mapping file)
//!   goes in a `text` block.
//! - ```` ```sh ````, `bash`, `shell`, `console`: every command line that starts (after an
//!   optional `$ ` prompt; in a `console` block the prompt is required, the other lines are
//!   output) with `lxbridge `, `./target/release/lxbridge `, `cargo run --release -- ` or
//!   `cargo run -- ` is split into words as a shell would (single and double quotes,
//!   backslash; `\` at the end of a line continues it; the command ends at an unquoted
//!   `|`, `>`, `<`, `&`, `;` or a word starting with `#`) and must parse with
//!   `lxbridge::cli::Cli` (`--help` and `--version` count as parsing).
//!
//! Each failure names the file and line.

use clap::Parser;
use std::path::{Path, PathBuf};

/// What a `toml fragment` block is merged into.
const BASE: &str = r#"
[[node]]
name = "ut"
token = "ut-secret"

[[node]]
name = "site"
token = "site-secret"
[node.deliver]
mode = "push"
url = "https://site.example/hs/lx/receive"
"#;

/// The Markdown files the checks read, from the repository root (those that exist).
fn doc_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    markdown_files(&root.join("docs"), &mut files);
    files.push(root.join("clients/1c/README.md"));
    files
        .into_iter()
        .filter(|file| file.exists())
        .map(|file| {
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            let name = file.strip_prefix(root).unwrap().display().to_string();
            (name, text)
        })
        .collect()
}

/// Every `.md` file under `dir` (none if it doesn't exist), sorted.
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// The front pages stay short: README.md what it is, the two commands and a tour (the rest is
/// in docs/); ARCHITECTURE.md the map and the invariants.
#[test]
fn readme_and_architecture_stay_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, limit) in [("README.md", 250), ("ARCHITECTURE.md", 150)] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let lines = text.lines().count();
        assert!(
            lines <= limit,
            "{file} is {lines} lines, more than {limit}: move detail to docs/"
        );
    }
}

#[test]
fn toml_blocks_in_docs_are_valid_configs() {
    let docs = doc_files();
    assert!(!docs.is_empty(), "no README.md");
    let problems: Vec<String> = docs
        .iter()
        .flat_map(|(name, text)| check_toml_blocks(name, text))
        .collect();
    assert!(
        problems.is_empty(),
        "{} problem(s) in the docs' TOML blocks (the convention is at the top of \
         tests/it/docs.rs):\n\n{}\n",
        problems.len(),
        problems.join("\n\n")
    );
}

#[test]
fn commands_in_docs_parse() {
    let problems: Vec<String> = doc_files()
        .iter()
        .flat_map(|(name, text)| check_commands(name, text))
        .collect();
    assert!(
        problems.is_empty(),
        "{} lxbridge command(s) in the docs don't parse (the convention is at the top of \
         tests/it/docs.rs):\n\n{}\n",
        problems.len(),
        problems.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// Fenced blocks

/// A fenced block of a Markdown file.
#[derive(Debug)]
struct Block {
    /// The line of the opening fence (from 1).
    line: usize,
    /// The info string after the fence, trimmed (`toml fragment`).
    info: String,
    /// The lines between the fences, the fence's indentation removed.
    text: String,
}

/// Every fenced block (```` ``` ```` or `~~~`, at any indentation, so within list items too),
/// and a problem for a fence that is never closed.
fn blocks(file: &str, markdown: &str) -> (Vec<Block>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some((indent, fence, info)) = opening_fence(line) else {
            continue;
        };
        let mut text = String::new();
        let mut closed = false;
        for (_, inner) in lines.by_ref() {
            let trimmed = inner.trim();
            let marks = trimmed
                .chars()
                .take_while(|c| fence.starts_with(*c))
                .count();
            if marks >= fence.len() && trimmed[marks..].trim().is_empty() {
                closed = true;
                break;
            }
            let cut = inner.len() - inner.trim_start().len();
            text.push_str(&inner[cut.min(indent)..]);
            text.push('\n');
        }
        if !closed {
            problems.push(format!(
                "{file}:{}: the block opened here is never closed",
                i + 1
            ));
        }
        found.push(Block {
            line: i + 1,
            info,
            text,
        });
    }
    (found, problems)
}

/// `(indentation, fence, info)` when `line` opens a fenced block.
fn opening_fence(line: &str) -> Option<(usize, String, String)> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let mark = trimmed.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let count = trimmed.chars().take_while(|c| *c == mark).count();
    if count < 3 {
        return None;
    }
    let info = trimmed[count..].trim();
    if mark == '`' && info.contains('`') {
        return None; // inline code such as ```` ```toml ```` in a sentence
    }
    Some((indent, mark.to_string().repeat(count), info.to_string()))
}

// ---------------------------------------------------------------------------------------
// TOML blocks

/// Every problem with the `toml` and `toml fragment` blocks of one file.
fn check_toml_blocks(file: &str, markdown: &str) -> Vec<String> {
    let (blocks, mut problems) = blocks(file, markdown);
    for block in blocks {
        let at = format!("{file}:{}", block.line);
        let found = match block.info.as_str() {
            "toml" => config_problems(&block.text, &at),
            "toml fragment" => match merge_into_base(&block.text) {
                Ok(text) => config_problems(&text, &at)
                    .into_iter()
                    .map(|p| format!("{p}\n    (the fragment merged into the base config of tests/it/docs.rs)"))
                    .collect(),
                Err(e) => vec![format!("{at}: toml fragment is not TOML: {e}")],
            },
            info if info.to_lowercase().contains("toml") => vec![format!(
                "{at}: info string {info:?}: write `toml` (a whole config) or `toml fragment` \
                 (merged into the base config), or `text` for TOML that is not a config"
            )],
            _ => Vec::new(),
        };
        problems.extend(found);
    }
    problems
}

/// What is wrong with a whole config: reading it, then validating it.
fn config_problems(text: &str, at: &str) -> Vec<String> {
    match lxbridge::config::Config::parse(text, at) {
        Err(e) => vec![format!("{at}: the config does not read: {e}")],
        Ok(mut config) => {
            config.base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            config
                .validate()
                .into_iter()
                .map(|problem| format!("{at}: {problem}"))
                .collect()
        }
    }
}

/// [`BASE`] with a fragment merged in (the rules at the top of this file), as TOML text.
fn merge_into_base(fragment: &str) -> Result<String, String> {
    let base: toml::Table = toml::from_str(BASE).expect("BASE is TOML");
    let fragment: toml::Table = toml::from_str(fragment).map_err(|e| e.to_string())?;
    toml::to_string(&merge(base, fragment)).map_err(|e| e.to_string())
}

fn merge(mut base: toml::Table, fragment: toml::Table) -> toml::Table {
    use toml::Value;
    for (key, value) in fragment {
        let Some(existing) = base.get_mut(&key) else {
            base.insert(key, value);
            continue;
        };
        match (key.as_str(), existing, value) {
            ("node", Value::Array(nodes), Value::Array(new)) => {
                for node in new {
                    let same = nodes
                        .iter()
                        .position(|n| n.get("name").is_some() && n.get("name") == node.get("name"));
                    match same {
                        Some(i) => nodes[i] = node,
                        None => nodes.push(node),
                    }
                }
            }
            ("route" | "group", Value::Array(entries), Value::Array(new)) => entries.extend(new),
            (_, Value::Table(table), Value::Table(new)) => table.extend(new),
            (_, existing, value) => *existing = value,
        }
    }
    base
}

// ---------------------------------------------------------------------------------------
// Commands

/// The shell blocks' info strings.
const SHELLS: [&str; 4] = ["sh", "bash", "shell", "console"];
/// How a command line starts, and what is lxbridge's arguments after it.
const STARTS: [&str; 4] = [
    "lxbridge ",
    "./target/release/lxbridge ",
    "cargo run --release -- ",
    "cargo run -- ",
];

/// Every `lxbridge` command of one file's shell blocks that doesn't parse.
fn check_commands(file: &str, markdown: &str) -> Vec<String> {
    let (blocks, _) = blocks(file, markdown); // unclosed fences: check_toml_blocks says so
    let mut problems = Vec::new();
    for block in blocks {
        let kind = block.info.split_whitespace().next().unwrap_or("");
        if !SHELLS.contains(&kind) {
            continue;
        }
        for (offset, command) in commands(&block.text, kind == "console") {
            let line = block.line + 1 + offset;
            let at = format!("{file}:{line} (in the block at line {})", block.line);
            let words = match shell_words(&command) {
                Ok(words) => words,
                Err(e) => {
                    problems.push(format!("{at}: `{command}`: {e}"));
                    continue;
                }
            };
            let args = std::iter::once("lxbridge".to_string()).chain(words);
            if let Err(e) = lxbridge::cli::Cli::try_parse_from(args) {
                use clap::error::ErrorKind;
                if !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                    let message = e.to_string();
                    let message = message.trim_end().replace('\n', "\n    ");
                    problems.push(format!("{at}: `{command}`:\n    {message}"));
                }
            }
        }
    }
    problems
}

/// The lxbridge command lines of a shell block: `(line within the block from 0, the
/// arguments after the command's start)`, continuation lines joined.
fn commands(text: &str, prompt_required: bool) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let first = i;
        let mut line = lines[i].trim().to_string();
        while line.ends_with('\\') && i + 1 < lines.len() {
            line.pop();
            i += 1;
            line.push(' ');
            line.push_str(lines[i].trim());
        }
        i += 1;
        let command = match line.strip_prefix("$ ") {
            Some(rest) => rest.trim_start(),
            None if prompt_required => continue,
            None => line.as_str(),
        };
        if let Some(args) = STARTS.iter().find_map(|s| command.strip_prefix(s)) {
            found.push((first, args.trim().to_string()));
        }
    }
    found
}

/// A command's words as a POSIX shell splits them, up to the first unquoted `|`, `>`, `<`,
/// `&`, `;` or `#` starting a word (a redirection's file descriptor, `2` of `2>`, dropped).
fn shell_words(command: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("a ' quote is not closed".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("a \" quote is not closed".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("a \" quote is not closed".into()),
                    }
                }
            }
            '\\' => {
                if let Some(c) = chars.next() {
                    word.get_or_insert_with(String::new).push(c);
                }
            }
            '>' => {
                if word
                    .as_deref()
                    .is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()))
                {
                    word = None;
                }
                break;
            }
            '|' | '<' | '&' | ';' => break,
            '#' if word.is_none() => break,
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

// ---------------------------------------------------------------------------------------
// The checks checked

#[test]
fn fences_are_found_with_their_lines() {
    let markdown = "# T\n\n```toml fragment\n[a]\n```\n\n- item:\n\n  ~~~sh\n  lxbridge x\n  ~~~\n\
                    \nSay ```toml``` inline.\n\n````text\n```\n````\n\n```sh\nunclosed\n";
    let (found, problems) = blocks("d.md", markdown);
    let seen: Vec<(usize, &str, &str)> = found
        .iter()
        .map(|b| (b.line, b.info.as_str(), b.text.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (3, "toml fragment", "[a]\n"),
            (9, "sh", "lxbridge x\n"),
            (15, "text", "```\n"),
            (19, "sh", "unclosed\n"),
        ]
    );
    assert_eq!(problems, ["d.md:19: the block opened here is never closed"]);
}

#[test]
fn fragments_merge_into_the_base_as_documented() {
    let fragment = r#"
[server]
max_body_bytes = 1000

[[node]]
name = "site"
token = "other-secret"

[[node]]
name = "erp"
token = "erp-secret"

[[route]]
from = "ut"
to = ["site"]
"#;
    let base: toml::Table = toml::from_str("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let mut base_with_nodes: toml::Table = toml::from_str(BASE).unwrap();
    base_with_nodes.extend(base);
    let merged = merge(base_with_nodes, toml::from_str(fragment).unwrap());
    let server = merged["server"].as_table().unwrap();
    assert_eq!(server["listen"].as_str(), Some("127.0.0.1:1"));
    assert_eq!(server["max_body_bytes"].as_integer(), Some(1000));
    let nodes: Vec<(&str, &str)> = merged["node"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["token"].as_str().unwrap()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("ut", "ut-secret"),
            ("site", "other-secret"),
            ("erp", "erp-secret")
        ]
    );
    assert_eq!(merged["route"].as_array().unwrap().len(), 1);
}

#[test]
fn toml_checks_name_file_and_line() {
    let markdown = r#"
```toml
[[node]]
name = "a"
token = "a-secret"
```

```toml fragment
[[route]]
from = "ut"
to = ["site"]
```

```toml fragment
[[route]]
from = "nowhere"
to = ["site"]
```

```toml
[server]
lisen = "x"
```

```TOML
[a]
```

```toml-fragment
[a]
```

```json
{"toml": true}
```
"#;
    // The base alone is a valid config, and so is a route from ut to site added to it.
    assert_eq!(config_problems(BASE, "BASE"), Vec::<String>::new());
    let problems = check_toml_blocks("x.md", markdown);
    let mut places: Vec<&str> = problems
        .iter()
        .map(|p| p.split(": ").next().unwrap())
        .collect();
    places.dedup();
    assert_eq!(
        places,
        ["x.md:14", "x.md:20", "x.md:25", "x.md:29"],
        "{problems:#?}"
    );
    assert!(problems[0].contains("nowhere"), "{}", problems[0]);
    assert!(problems[1].contains("lisen"), "{}", problems[1]);
}

#[test]
fn command_lines_are_split_as_a_shell_does() {
    let words = |s: &str| shell_words(s).unwrap();
    assert_eq!(
        words("validate --config 'my dir/a.toml' # check it"),
        ["validate", "--config", "my dir/a.toml"]
    );
    assert_eq!(
        words(r#"transform -c "a \"b\".toml" --route r < change.json"#),
        ["transform", "-c", "a \"b\".toml", "--route", "r"]
    );
    assert_eq!(words("status REF 2>&1 | jq ."), ["status", "REF"]);
    assert_eq!(words("demo --exit && echo ok"), ["demo", "--exit"]);
    assert_eq!(words("run a\\ b; x"), ["run", "a b"]);
    assert!(shell_words("run 'open").is_err());

    let block = "$ lxbridge validate \\\n    --config a.toml\nlxbridge 0.1.0\n$ cargo run --release -- demo\n";
    assert_eq!(
        commands(block, true),
        [
            (0, "validate  --config a.toml".to_string()),
            (3, "demo".to_string())
        ]
    );
    assert_eq!(commands(block, false).len(), 3);
}

#[test]
fn command_checks_name_file_and_line() {
    let markdown = "```sh\nlxbridge validate --config x.toml\nlxbridge valdate\n\
                    ./target/release/lxbridge --help\ncargo run -- --version\n\
                    cargo run --release -- generate-config > lxbridge.toml\necho lxbridge\n```\n\
                    \n```text\nlxbridge nonsense\n```\n";
    let problems = check_commands("y.md", markdown);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("y.md:3 (in the block at line 1): `valdate`:")
            && problems[0].contains("valdate"),
        "{}",
        problems[0]
    );
}
