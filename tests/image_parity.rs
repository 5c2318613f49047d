//! The Dockerfile and `tests/images/build.sh stash` describe one image: the test builds the archive (cached)
//! and compares it with the Dockerfile's final stage — base release, installed packages, user, entrypoint,
//! command, environment, working directory, the files the stage copies in and the lines it appends.
//! Any difference fails, so the image users build with Docker is the one the tests run.

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Dockerfile's final stage: what the image is made of.
#[derive(Debug, Default)]
struct Stage {
    base: String,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    /// (`--from` stage, source, destination)
    copies: Vec<(Option<String>, String, String)>,
    runs: Vec<String>,
}

fn parse_dockerfile(text: &str) -> Stage {
    // Logical lines: comments dropped, backslash continuations joined.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || (current.is_empty() && line.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stage = Stage::default();
    for line in lines {
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line.as_str(), ""));
        let rest = rest.trim();
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => {
                let base = rest.split_whitespace().next().expect("FROM names an image");
                stage = Stage { base: base.to_string(), ..Stage::default() };
            }
            "ARG" => {}
            "USER" => stage.user = Some(rest.to_string()),
            "WORKDIR" => stage.workdir = Some(rest.to_string()),
            "ENTRYPOINT" => {
                stage.entrypoint = Some(serde_json::from_str(rest).expect("ENTRYPOINT in exec (JSON) form"))
            }
            "CMD" => stage.cmd = Some(serde_json::from_str(rest).expect("CMD in exec (JSON) form")),
            "ENV" => {
                for pair in rest.split_whitespace() {
                    assert!(!pair.contains(['"', '\'']), "ENV {pair}: quoted values are not understood here");
                    let (key, value) = pair.split_once('=').expect("ENV in key=value form");
                    stage.env.insert(key.to_string(), value.to_string());
                }
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let from = words.iter().find_map(|w| w.strip_prefix("--from=")).map(str::to_string);
                let paths: Vec<&str> = words.iter().copied().filter(|w| !w.starts_with("--")).collect();
                assert_eq!(paths.len(), 2, "COPY {rest}: one source and one destination expected");
                stage.copies.push((from, paths[0].to_string(), paths[1].to_string()));
            }
            "RUN" => stage.runs.push(rest.to_string()),
            other => panic!("{other} in the Dockerfile: teach tests/image_parity.rs what it means for the image"),
        }
    }
    stage
}

/// One entry of a layer's file list.
#[derive(Debug, Clone)]
struct Entry {
    mode: String,
    owner: String,
    /// The name as stored in the layer (`./etc/passwd` or `usr/local/bin/stash`).
    stored: String,
    /// A symbolic link's target.
    link: Option<String>,
    layer: usize,
}

/// An OCI archive as `tests/images/build.sh` writes it.
struct Image {
    archive: PathBuf,
    config: Value,
    layers: Vec<String>,
    /// Every path (normalised: no `./`, no trailing `/`) in the merged layers.
    files: BTreeMap<String, Entry>,
}

fn tar_out(args: &[&str], archive: &Path) -> Vec<u8> {
    let out = Command::new("tar").args(args).arg(archive).output().expect("tar runs");
    assert!(out.status.success(), "tar {args:?} {}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Runs `tar ARGS -f -` over the gzipped `layer` on stdin.
fn tar_layer(layer: &[u8], args: &[&str]) -> Vec<u8> {
    let mut child = Command::new("tar")
        .args(args)
        .args(["-z", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tar runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = layer.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("tar finishes");
    writer.join().expect("writer");
    assert!(out.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn normalise(name: &str) -> String {
    name.trim_start_matches("./").trim_end_matches('/').to_string()
}

impl Image {
    fn open(archive: PathBuf) -> Image {
        let json =
            |name: &str| -> Value { serde_json::from_slice(&tar_out(&["-xO", name, "-f"], &archive)).expect("JSON") };
        let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let index = json("index.json");
        let manifest = json(&blob(index["manifests"][0]["digest"].as_str().expect("manifest digest")));
        let config = json(&blob(manifest["config"]["digest"].as_str().expect("config digest")));
        let layers: Vec<String> = manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| blob(l["digest"].as_str().expect("layer digest")))
            .collect();
        let mut image = Image { archive, config, layers, files: BTreeMap::new() };
        for (index, name) in image.layers.clone().iter().enumerate() {
            let listing = tar_layer(&image.blob(name), &["-tv", "--numeric-owner"]);
            for line in String::from_utf8(listing).expect("UTF-8 names").lines() {
                // mode owner/group size date time name[ -> target]
                let words: Vec<&str> = line.split_whitespace().collect();
                assert!(words.len() >= 6, "unexpected tar listing line: {line}");
                let (mode, owner) = (words[0].to_string(), words[1].to_string());
                let name = words[5..].join(" ");
                let (stored, link) = match name.split_once(" -> ") {
                    Some((stored, link)) if mode.starts_with('l') => (stored.to_string(), Some(link.to_string())),
                    _ => (name, None),
                };
                image.files.insert(normalise(&stored), Entry { mode, owner, stored, link, layer: index });
            }
        }
        image
    }

    fn blob(&self, name: &str) -> Vec<u8> {
        tar_out(&["-xO", name, "-f"], &self.archive)
    }

    /// The content of a regular file in the image, following symbolic links.
    fn read(&self, path: &str) -> String {
        let entry = self.files.get(path).unwrap_or_else(|| panic!("{path} is not in the image"));
        if let Some(link) = &entry.link {
            let target = match link.strip_prefix('/') {
                Some(absolute) => absolute.to_string(),
                None => Path::new(path).parent().unwrap_or(Path::new("")).join(link).to_string_lossy().into_owned(),
            };
            // Resolve `..` lexically: enough for the links Debian packages ship.
            let mut parts: Vec<&str> = Vec::new();
            for part in target.split('/') {
                match part {
                    ".." => {
                        parts.pop();
                    }
                    "." | "" => {}
                    part => parts.push(part),
                }
            }
            return self.read(&parts.join("/"));
        }
        let layer = self.blob(&self.layers[entry.layer]);
        String::from_utf8(tar_layer(&layer, &["-xO", &entry.stored])).expect("UTF-8 file")
    }
}

fn build_stash_image() -> PathBuf {
    let out = Command::new(repo().join("tests/images/build.sh"))
        .arg("stash")
        .stderr(Stdio::inherit())
        .output()
        .expect("tests/images/build.sh runs");
    assert!(out.status.success(), "tests/images/build.sh stash failed");
    PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8 path").trim())
}

fn package_list(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .flat_map(|line| {
            line.split('#').next().unwrap_or_default().split_whitespace().map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

/// `NAME` of packages dpkg reports as installed.
fn installed_packages(status: &str) -> Vec<String> {
    status
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Package: ")).map(str::to_string))
        .collect()
}

#[test]
fn the_dockerfile_and_the_test_image_build_are_the_same_image() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("the Dockerfile");
    let stage = parse_dockerfile(&dockerfile);
    let image = Image::open(build_stash_image());
    let config = &image.config["config"];
    let mut differences = Vec::new();

    // Base: debian:<codename>-slim; the image's Debian release must be that codename.
    let codename = stage
        .base
        .strip_prefix("debian:")
        .and_then(|tag| tag.strip_suffix("-slim"))
        .unwrap_or_else(|| panic!("base {}: a debian:<release>-slim image expected", stage.base));
    let os_release = image.read("etc/os-release");
    let image_codename = os_release.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).unwrap_or_default();
    differ(&mut differences, "Debian release", codename.to_string(), image_codename.to_string());

    // Packages: the Dockerfile copies one list in and installs it; build.sh reads the same file.
    let (_, list, copied_to) = stage
        .copies
        .iter()
        .find(|(from, src, _)| from.is_none() && src.ends_with(".packages"))
        .expect("the Dockerfile copies a package list in");
    assert!(stage.runs.iter().any(|run| run.contains(copied_to.as_str()) && run.contains("apt-get install")));
    let build_sh = std::fs::read_to_string(repo().join("tests/images/build.sh")).expect("build.sh");
    assert!(build_sh.contains(&format!("$repo/{list}")), "tests/images/build.sh does not read {list}");
    let installed = installed_packages(&image.read("var/lib/dpkg/status"));
    let packages = package_list(&repo().join(list));
    assert!(!packages.is_empty(), "{list} names no package");
    for package in &packages {
        if !installed.contains(package) {
            differences.push(format!("package {package}: in {list}, not installed in the image"));
        }
    }

    // The image's configuration.
    let strings = |v: &Value| {
        v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect::<Vec<_>>())
    };
    differ(
        &mut differences,
        "USER",
        format!("{:?}", stage.user.clone().unwrap_or_default()),
        format!("{:?}", config["User"].as_str().unwrap_or_default()),
    );
    differ(
        &mut differences,
        "ENTRYPOINT",
        format!("{:?}", stage.entrypoint),
        format!("{:?}", strings(&config["Entrypoint"])),
    );
    differ(&mut differences, "CMD", format!("{:?}", stage.cmd), format!("{:?}", strings(&config["Cmd"])));
    let env: BTreeMap<String, String> = strings(&config["Env"])
        .unwrap_or_default()
        .iter()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).expect("Env in key=value form"))
        .collect();
    differ(&mut differences, "ENV", format!("{:?}", stage.env), format!("{env:?}"));
    let workdir = config["WorkingDir"].as_str().filter(|w| !w.is_empty()).unwrap_or("/");
    differ(&mut differences, "WORKDIR", stage.workdir.clone().unwrap_or_else(|| "/".into()), workdir.to_string());

    // Files from other stages: executables owned by root, and the only files not from Debian packages.
    let mut copied: Vec<String> = Vec::new();
    for (from, _, dest) in stage.copies.iter().filter(|(from, _, _)| from.is_some()) {
        let path = normalise(dest.trim_start_matches('/'));
        match image.files.get(&path) {
            None => {
                differences.push(format!("{dest} (COPY --from={}): not in the image", from.as_deref().unwrap_or("")))
            }
            Some(entry) => differ(
                &mut differences,
                &format!("{dest} mode and owner"),
                "-rwxr-xr-x 0/0".into(),
                format!("{} {}", entry.mode, entry.owner),
            ),
        }
        copied.push(path);
    }
    copied.sort();
    let added: Vec<&String> =
        image.files.iter().filter(|(_, e)| e.layer > 0 && e.mode.starts_with('-')).map(|(path, _)| path).collect();
    differ(
        &mut differences,
        "files added over the Debian root filesystem",
        format!("{:?}", copied.iter().collect::<Vec<_>>()),
        format!("{added:?}"),
    );

    // Lines the Dockerfile appends to files (the nonroot user), and the directories it makes.
    for run in &stage.runs {
        for command in run.split("&&").map(str::trim) {
            if let Some(rest) = command.strip_prefix("echo \"") {
                let (line, target) = rest.split_once("\" >>").expect("echo \"LINE\" >>FILE");
                let target = target.trim().trim_start_matches('/');
                if !image.read(target).lines().any(|l| l == line) {
                    differences.push(format!("/{target}: the Dockerfile appends {line:?}, the image lacks it"));
                }
            } else if let Some(rest) = command.strip_prefix("mkdir -m ") {
                let (mode, dir) = rest.split_once(' ').expect("mkdir -m MODE DIR");
                let chown = run
                    .split("&&")
                    .find_map(|c| c.trim().strip_prefix("chown ").and_then(|c| c.strip_suffix(&format!(" {dir}"))))
                    .unwrap_or("0:0");
                let entry = image.files.get(dir.trim_start_matches('/'));
                let expected = format!("{} {}", symbolic_dir_mode(mode), chown.replace(':', "/"));
                differ(
                    &mut differences,
                    dir,
                    expected,
                    entry.map(|e| format!("{} {}", e.mode, e.owner)).unwrap_or("nothing".into()),
                );
            }
        }
    }

    assert!(differences.is_empty(), "the Dockerfile and tests/images/build.sh differ:\n{}", differences.join("\n"));
}

/// Notes a difference when the Dockerfile's value and the image's are not the same.
fn differ(differences: &mut Vec<String>, what: &str, dockerfile: String, image: String) {
    if dockerfile != image {
        differences.push(format!("{what}: the Dockerfile says {dockerfile}, the image has {image}"));
    }
}

/// `0755` as `ls` and tar show a directory: `drwxr-xr-x`.
fn symbolic_dir_mode(octal: &str) -> String {
    let bits = u32::from_str_radix(octal, 8).expect("octal mode");
    let mut out = String::from("d");
    for shift in [6, 3, 0] {
        let b = (bits >> shift) & 7;
        out.push(if b & 4 != 0 { 'r' } else { '-' });
        out.push(if b & 2 != 0 { 'w' } else { '-' });
        out.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    out
}

#[test]
fn the_dockerfile_parser_reads_continuations_env_and_copies() {
    let stage = parse_dockerfile(
        "# comment\nARG X=1\nFROM a AS b\nUSER 1\nFROM debian:bookworm-slim\nRUN a \\\n    && b\n\
         ENV A=1 B=2\nCOPY --from=b /x /y\nCOPY l.packages /tmp/l\nUSER 2:2\nENTRYPOINT [\"/e\"]\n",
    );
    assert_eq!(stage.base, "debian:bookworm-slim");
    assert_eq!(stage.user.as_deref(), Some("2:2"));
    assert_eq!(stage.runs, vec!["a  && b".to_string()]);
    assert_eq!(stage.env.get("B").map(String::as_str), Some("2"));
    assert_eq!(stage.copies[0], (Some("b".into()), "/x".into(), "/y".into()));
    assert_eq!(stage.copies[1].0, None);
    assert_eq!(stage.entrypoint, Some(vec!["/e".to_string()]));
    assert_eq!(symbolic_dir_mode("0755"), "drwxr-xr-x");
}
