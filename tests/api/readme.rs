//! The README as a new user meets it: every block in README.md is taken out of the file and
//! run as written against the sluice the README starts (the binary, open, from the
//! project's root, the local model on when its weights are there), with only the port
//! changed: shell blocks by bash, Python by python3, JavaScript in Chromium on sluice's
//! page, TOML through sluice's start-up, and a sample output compared with what the block
//! before it printed. The coding agents' blocks run the agents themselves. And every link
//! of the README and of the book in `docs/` goes somewhere that exists.
//!
//! A block's way of being checked follows its language; a comment on the line before it,
//! `<!-- check: … -->`, says otherwise: `skip (why)`, `the output of the block above`,
//! `~/.codex/config.toml` (a file written where it says), `start-up, with each one of VAR…`
//! (sluice started with only that one key set, each in turn), `start-up, then the agents
//! with their own model names`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::browser::{browser, start_driver};
use crate::js::npm_installed;
use crate::startup::{Running, sluice};
use crate::support::skip_without;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The address the README's blocks name; each run replaces it with the test's own.
const README_ADDR: &str = "127.0.0.1:3000";
/// The most one block may take to run.
const BLOCK_RUN: Duration = Duration::from_secs(120);

/// One fenced block of a markdown file.
#[derive(Debug)]
struct Block {
    lang: String,
    code: String,
    /// What the `<!-- check: … -->` comment before it says, if there is one.
    check: Option<String>,
    line: usize,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    let mut previous = "";
    for (i, line) in markdown.lines().enumerate() {
        if let Some(block) = open.as_mut() {
            if line.starts_with("```") {
                blocks.extend(open.take());
            } else {
                block.code.push_str(line);
                block.code.push('\n');
            }
        } else if let Some(info) = line.strip_prefix("```") {
            let check = previous
                .trim()
                .strip_prefix("<!-- check:")
                .and_then(|c| c.strip_suffix("-->"))
                .map(|c| c.trim().to_owned());
            open = Some(Block {
                lang: info.split_whitespace().next().unwrap_or("").to_owned(),
                code: String::new(),
                check,
                line: i + 1,
            });
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    blocks
}

/// What a run of the blocks shares: the sluice they talk to, a home and a working
/// directory of their own, and the agents when they are installed.
struct Reader {
    sluice: Running,
    home: PathBuf,
    work: PathBuf,
    /// A folder of `codex` and `claude` commands, first on the PATH.
    bin: Option<PathBuf>,
}

fn weights() -> Option<PathBuf> {
    let path = Path::new(ROOT).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    path.exists().then_some(path)
}

/// sluice as `cargo run --release` starts it from the project's root, on a free port:
/// nothing configured, the local model loaded when its weights are there.
fn start(extra: &[(&str, &str)]) -> Running {
    let mut vars = vec![("SLUICE_ADDR", "127.0.0.1:0")];
    if weights().is_none() {
        vars.push(("SLUICE_LOCAL_MODEL", "off"));
    }
    vars.extend_from_slice(extra);
    Running::start_command(sluice(&vars))
}

/// `codex` and `claude` as commands, from the agents' pinned packages; `None` (after
/// saying why) when they cannot be installed here.
fn agents() -> Option<PathBuf> {
    let dir = npm_installed("agents", &["package.json"])?;
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-bin");
    std::fs::create_dir_all(&bin).expect("a folder of commands");
    let shim = |name: &str, target: String| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\nexec {target} \"$@\"\n")).expect("a command");
        Command::new("chmod")
            .arg("+x")
            .arg(&path)
            .status()
            .expect("chmod");
    };
    shim(
        "codex",
        format!(
            "node {}",
            dir.join("node_modules/@openai/codex/bin/codex.js")
                .display()
        ),
    );
    shim(
        "claude",
        dir.join("node_modules/claude-code-2.1.332/bin/claude.exe")
            .display()
            .to_string(),
    );
    Some(bin)
}

fn needs_agents(code: &str) -> bool {
    code.lines()
        .any(|l| l.starts_with("codex ") || l.starts_with("claude "))
}

impl Reader {
    fn new(sluice: Running, bin: Option<PathBuf>) -> Reader {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("readme")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let (home, work) = (base.join("home"), base.join("work"));
        std::fs::create_dir_all(&home).expect("a home");
        std::fs::create_dir_all(&work).expect("a working directory");
        Reader {
            sluice,
            home,
            work,
            bin,
        }
    }

    /// `code` with the README's address made this sluice's.
    fn here(&self, code: &str) -> String {
        code.replace(README_ADDR, &self.sluice.addr)
    }

    /// Runs `program` on `code` (`-c code`, or its standard input) in the reader's
    /// working directory; what it printed, or the test fails with it.
    fn run(&self, program: &str, code: &str, line: usize) -> String {
        let path = match &self.bin {
            Some(bin) => format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            None => std::env::var("PATH").unwrap_or_default(),
        };
        let mut command = std::process::Command::new("timeout");
        command
            .arg(BLOCK_RUN.as_secs().to_string())
            .arg(program)
            .arg("-c")
            .arg(self.here(code))
            .current_dir(&self.work)
            .stdin(std::process::Stdio::null())
            .env("PATH", path)
            .env("HOME", &self.home)
            // The agents' own updaters and telemetry: nothing to do with the blocks.
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env_remove("OPENAI_API_KEY")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("ANTHROPIC_BASE_URL");
        let output = command.output().expect("the block runs");
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        let errors = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "README.md:{line}: the {program} block failed ({}):\n{printed}\n{errors}",
            output.status
        );
        assert!(
            !printed.contains("\"error\""),
            "README.md:{line}: the {program} block printed an error:\n{printed}"
        );
        if needs_agents(code) {
            // What an agent says may go to either stream.
            return format!("{printed}{errors}");
        }
        printed
    }
}

/// Values that differ from run to run, made the same in a sample and in what was printed.
fn steady(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut line = line.trim_end().to_owned();
        for field in ["created", "duration_ms", "ttft_ms"] {
            let key = format!("\"{field}\":");
            if let Some(at) = line.find(&key) {
                let start = at + key.len();
                let end = line[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(line.len(), |n| start + n);
                line.replace_range(start..end, "0");
            }
        }
        if let Some(at) = line.find("\"id\":\"") {
            let start = at + "\"id\":\"".len();
            if let Some(len) = line[start..].find('"') {
                line.replace_range(start..start + len, "…");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Whether `printed` is what `sample` shows: its parts between `…` lines, in order, the
/// first at the start and the last at the end.
fn shows(sample: &str, printed: &str) -> bool {
    let (sample, printed) = (steady(sample), steady(printed));
    let parts: Vec<&str> = sample.split("…\n").collect();
    let mut rest = printed.as_str();
    for (i, part) in parts.iter().enumerate() {
        let part = if i + 1 < parts.len() {
            part.trim_end_matches('\n')
        } else {
            part
        };
        if i == 0 {
            if !rest.starts_with(part) {
                return false;
            }
            rest = &rest[part.len()..];
        } else if i + 1 == parts.len() {
            return rest.trim_end().ends_with(part.trim_end());
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The TOML block `code` as sluice's config, for a sluice started with `vars`.
fn with_config(reader: &Reader, code: &str, vars: &[(&str, &str)]) -> Running {
    let file = reader
        .work
        .join(format!("sluice-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, code).expect("the block's config");
    let file = file.display().to_string();
    let mut all = vec![("SLUICE_CONFIG", file.as_str())];
    all.extend_from_slice(vars);
    start(&all)
}

/// A name each pattern route of `toml` takes, with the variable its key is in.
fn routes_of(toml: &str) -> Vec<(String, Option<String>)> {
    let parsed: toml::Table = toml.parse().expect("the block is TOML");
    let models = parsed.get("models").and_then(|m| m.as_table());
    models
        .into_iter()
        .flatten()
        .map(|(name, route)| {
            let var = route
                .get("api_key_env")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            (name.replace('*', "test-model"), var)
        })
        .collect()
}

async fn chat(sluice: &Running, model: &str) -> (u16, String) {
    let answer = reqwest::Client::new()
        .post(sluice.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("sluice answers");
    (
        answer.status().as_u16(),
        answer.text().await.unwrap_or_default(),
    )
}

/// A route block that needs a provider's key starts with any one of them: the routes whose
/// key is set are served, each other one answers 404 naming its variable.
async fn starts_with_each_key(reader: &Reader, code: &str, vars: &[&str], line: usize) {
    let routes = routes_of(code);
    for var in vars {
        let sluice = with_config(reader, code, &[(var, "sk-placeholder")]);
        for (model, needs) in &routes {
            let on = needs.as_deref() == Some(*var) || needs.is_none();
            let listed = reqwest::get(sluice.url(&format!("/v1/models/{model}")))
                .await
                .expect("sluice answers")
                .status()
                .as_u16();
            if on {
                assert_eq!(listed, 200, "README.md:{line}: {model} with only {var} set");
            } else {
                let (status, body) = chat(&sluice, model).await;
                let needed = needs.as_deref().unwrap_or_default();
                assert_eq!(status, 404, "README.md:{line}: {model}: {body}");
                assert!(body.contains(needed), "README.md:{line}: {model}: {body}");
                assert_eq!(listed, 404, "README.md:{line}: {model} listed while off");
            }
        }
    }
}

/// The agents with no model named (their own defaults), on a sluice whose config is `code`.
fn agents_with_their_defaults(reader: &Reader, code: &str, codex_config: &str, line: usize) {
    let sluice = with_config(reader, code, &[]);
    let other = Reader::new(sluice, reader.bin.clone());
    let codex_home = other.home.join(".codex");
    std::fs::create_dir_all(&codex_home).expect("codex home");
    std::fs::write(codex_home.join("config.toml"), other.here(codex_config)).expect("config");
    for agent in [
        "export SLUICE_CLIENT_KEY=sk-any\ncodex exec --skip-git-repo-check \"say hello\"\n",
        "export ANTHROPIC_BASE_URL=http://127.0.0.1:3000 ANTHROPIC_API_KEY=sk-any\n\
         claude -p \"say hello\"\n",
    ] {
        let said = other.run("bash", agent, line);
        assert!(
            said.contains("You said: say hello."),
            "README.md:{line}: {agent}: {said}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_block_works_as_written() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let blocks = blocks(&readme);
    let bin = if blocks.iter().any(|b| needs_agents(&b.code)) {
        tokio::task::spawn_blocking(agents)
            .await
            .expect("the agents install")
    } else {
        None
    };
    let python_sdks = Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .status()
        .is_ok_and(|s| s.success());
    let driver = if blocks.iter().any(|b| b.lang == "js") {
        start_driver()
    } else {
        None
    };
    let reader = Reader::new(start(&[]), bin);
    let mut printed: Option<(usize, String)> = None;
    let mut codex_config = None;
    let mut ran = 0;
    for block in &blocks {
        let check = block.check.as_deref().unwrap_or("");
        let line = block.line;
        if check.starts_with("skip") {
            continue;
        }
        if check.starts_with("the output of the block above") {
            let (from, out) = printed.as_ref().expect("a block ran before the sample");
            assert!(
                shows(&block.code, out),
                "README.md:{line}: the sample output is not what the block at line {from} printed:\n{out}"
            );
            ran += 1;
            continue;
        }
        if check == "~/.codex/config.toml" {
            let dir = reader.home.join(".codex");
            std::fs::create_dir_all(&dir).expect("codex home");
            std::fs::write(dir.join("config.toml"), reader.here(&block.code)).expect("config");
            codex_config = Some(block.code.clone());
            ran += 1;
            continue;
        }
        match block.lang.as_str() {
            "sh" | "bash" => {
                if needs_agents(&block.code) && reader.bin.is_none() {
                    continue;
                }
                let out = tokio::task::block_in_place(|| reader.run("bash", &block.code, line));
                if needs_agents(&block.code) {
                    assert!(
                        out.contains("You said: say hello."),
                        "README.md:{line}: {out}"
                    );
                }
                printed = Some((line, out));
            }
            "python" => {
                if !python_sdks && skip_without("the Python openai and anthropic SDKs") {
                    continue;
                }
                let out = tokio::task::block_in_place(|| reader.run("python3", &block.code, line));
                assert!(!out.trim().is_empty(), "README.md:{line}: printed nothing");
                printed = Some((line, out));
            }
            "js" => {
                let Some(driver) = &driver else { continue };
                let out = in_the_page(driver, &reader, &block.code).await;
                assert!(
                    out.starts_with("You said: Hello"),
                    "README.md:{line}: {out}"
                );
                printed = Some((line, out));
            }
            "toml" if check.starts_with("start-up, with each one of") => {
                let vars: Vec<&str> = check
                    .trim_start_matches("start-up, with each one of")
                    .split_whitespace()
                    .collect();
                assert!(!vars.is_empty(), "README.md:{line}: names no variable");
                starts_with_each_key(&reader, &block.code, &vars, line).await;
            }
            "toml" if check.starts_with("start-up, then the agents") => {
                let sluice = with_config(&reader, &block.code, &[]);
                drop(sluice);
                if reader.bin.is_some() {
                    let codex = codex_config
                        .as_deref()
                        .expect("the Codex config comes first");
                    tokio::task::block_in_place(|| {
                        agents_with_their_defaults(&reader, &block.code, codex, line)
                    });
                }
            }
            "toml" => drop(with_config(&reader, &block.code, &[])),
            "text" | "" => panic!("README.md:{line}: a block of output says of what"),
            other => panic!("README.md:{line}: no way to check a {other:?} block"),
        }
        ran += 1;
    }
    assert!(ran >= 10, "only {ran} blocks were checked");
}

/// Runs the `js` block in Chromium on sluice's page; the text it wrote in its `<pre>`
/// once its stream is done.
async fn in_the_page(driver: &crate::browser::Driver, reader: &Reader, code: &str) -> String {
    let client = browser(driver).await;
    client
        .goto(&reader.sluice.url("/"))
        .await
        .expect("the page opens");
    let script = format!(
        "const done = arguments[arguments.length - 1];\n(async () => {{\n{code}\n\
         events.addEventListener('done', () => done(out.textContent));\n}})()\
         .catch((e) => done('threw: ' + e));"
    );
    let out = client
        .execute_async(&script, vec![])
        .await
        .expect("the block runs");
    let _ = client.close().await;
    out.as_str().unwrap_or_default().to_owned()
}

/// Every link of the README and the book points at a file that exists, and at a heading
/// of it when it names one; every chapter is in the book's summary.
#[test]
fn every_link_of_the_readme_and_the_book_resolves() {
    let root = Path::new(ROOT);
    let book = root.join("docs/src");
    let mut files = vec![root.join("README.md")];
    let mut chapters: Vec<PathBuf> = std::fs::read_dir(&book)
        .expect("docs/src")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    chapters.sort();
    files.extend(chapters.iter().cloned());
    let summary = std::fs::read_to_string(book.join("SUMMARY.md")).expect("SUMMARY.md");
    for chapter in &chapters {
        let name = chapter.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(
            name == "SUMMARY.md" || summary.contains(&format!("({name})")),
            "docs/src/{name} is not in SUMMARY.md"
        );
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a folder").join(path)
            };
            let shown = file
                .strip_prefix(root)
                .unwrap_or(file)
                .display()
                .to_string();
            if !dest.exists() {
                broken.push(format!("{shown}: {target} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor {
                let headings = anchors(&std::fs::read_to_string(&dest).unwrap_or_default());
                if !headings.contains(anchor) {
                    broken.push(format!("{shown}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 20, "only {checked} links found");
}

/// The targets of a markdown text's links and images, outside code.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Inline code is not a link.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            found.push(after[..end].trim().to_owned());
            rest = &after[end..];
        }
    }
    found
}

/// The ids mdBook and GitHub give a text's headings.
fn anchors(text: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim().to_lowercase();
        let id: String = title
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c),
                c if c.is_whitespace() => Some('-'),
                _ => None,
            })
            .collect();
        ids.insert(id);
    }
    ids
}

#[test]
fn a_sample_output_matches_in_order_with_gaps() {
    let printed = "retry: 1000\nid: 1\ndata: {\"created\":5,\"id\":\"abc\"}\nid: 2\nid: 3\nid: 4\n";
    assert!(shows(
        "retry: 1000\nid: 1\ndata: {\"created\":9,\"id\":\"x…\"}\n…\nid: 4\n",
        printed
    ));
    assert!(!shows("retry: 1000\n…\nid: 9\n", printed));
    assert!(!shows("id: 1\n…\nid: 4\n", printed));
}
