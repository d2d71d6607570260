//! Reading Kubernetes-shaped YAML: a file or a directory of `*.yaml`/`*.yml` files, each holding
//! one or more documents.
//!
//! The file is split into documents at `---`/`...` marker lines (YAML forbids these at column 0
//! inside scalars, so the split is exact), and each document is parsed on its own, the lines it
//! reports shifted back to the file's. Core v1 kinds are
//! deserialized into k8s-openapi types through `serde_path_to_error` (for the field path of a
//! type error), then converted by [`super::build`]. Semantic errors carry a field path too; their
//! line is found by a small block-style YAML walk ([`locate`]), falling back to the document's
//! first line. [`FileSource`] re-reads the files when they change and publishes each good
//! load to the [`super::Registry`].

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

mod locate;
mod watch;

pub use locate::locate;
pub use watch::{FileSource, WatchConfig};

use super::build::{object_key, FieldError, Inserted, Object, ObjectKey, SnapshotBuilder};
use super::kinds;
use super::model::{NotApplied, RawObject, Snapshot};

/// One problem in the source, e.g.
/// `pods.yaml:14: document 2 (Pod demo/client): spec.containers[0].ports[0].containerPort: invalid type: string "x", expected i32`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadError {
    pub file: PathBuf,
    /// 1-based line in `file`.
    pub line: Option<usize>,
    /// 1-based index of the document in `file` (empty documents are not counted).
    pub document: Option<usize>,
    /// The object, when known: `Pod demo/client`.
    pub object: Option<String>,
    /// Field path inside the document: `spec.ports[0].port`.
    pub path: Option<String>,
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(doc) = self.document {
            write!(f, "document {doc}")?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
            f.write_str(": ")?;
        }
        if let Some(path) = &self.path {
            write!(f, "{path}: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// Every problem of a failed load (never empty). Displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

impl std::ops::Deref for LoadErrors {
    type Target = [LoadError];
    fn deref(&self) -> &[LoadError] {
        &self.0
    }
}

/// A source file's name and content.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

fn io_error(file: &Path, what: &str, e: std::io::Error) -> LoadError {
    LoadError {
        file: file.to_path_buf(),
        line: None,
        document: None,
        object: None,
        path: None,
        reason: format!("{what}: {e}"),
    }
}

/// Whether a directory entry is a registry file: `*.yaml`/`*.yml`, not hidden (which also skips
/// a ConfigMap volume's `..data` links).
pub(crate) fn is_source_name(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// The files of `path`: the file itself, or a directory's `*.yaml`/`*.yml` files (not
/// recursive, following symlinks) in name order.
pub fn source_files(path: &Path) -> Result<Vec<PathBuf>, LoadErrors> {
    let meta =
        fs::metadata(path).map_err(|e| LoadErrors(vec![io_error(path, "cannot read", e)]))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries =
        fs::read_dir(path).map_err(|e| LoadErrors(vec![io_error(path, "cannot list", e)]))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LoadErrors(vec![io_error(path, "cannot list", e)]))?;
        if !is_source_name(&entry.file_name()) {
            continue;
        }
        let p = entry.path();
        if fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            files.push(p);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Reads every source file of `path` (see [`source_files`]).
pub fn read_sources(path: &Path) -> Result<Vec<SourceFile>, LoadErrors> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for file in source_files(path)? {
        match fs::read(&file) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => out.push(SourceFile { path: file, text }),
                Err(e) => errors.push(LoadError {
                    file,
                    line: None,
                    document: None,
                    object: None,
                    path: None,
                    reason: format!("not UTF-8: {e}"),
                }),
            },
            Err(e) => errors.push(io_error(&file, "cannot read", e)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(LoadErrors(errors))
    }
}

/// A hash of names and contents, to skip rebuilding when nothing changed.
pub fn fingerprint(files: &[SourceFile]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.path.hash(&mut h);
        f.text.hash(&mut h);
    }
    h.finish()
}

/// Parses and checks every document of `files` into a builder; any error fails the whole load.
pub fn parse_sources(files: &[SourceFile]) -> Result<SnapshotBuilder, LoadErrors> {
    let mut loader = Loader {
        builder: SnapshotBuilder::new(),
        origins: HashMap::new(),
        places: HashMap::new(),
        errors: Vec::new(),
    };
    for f in files {
        loader.file(&f.path, &f.text);
    }
    if loader.errors.is_empty() {
        // Checks across objects, reported at the object they belong to.
        for (key, FieldError { path, reason }) in loader.builder.validate() {
            let place = key.namespace.as_ref().and_then(|ns| {
                loader
                    .places
                    .get(&(key.kind.clone(), ns.clone(), key.name.clone()))
            });
            let error = match place {
                Some(place) => {
                    let doc = Doc {
                        file: &place.file,
                        index: place.index,
                        text: &place.text,
                        line_offset: place.line_offset,
                        first_line: place.first_line,
                    };
                    doc.error(
                        None,
                        Some(&place.label),
                        Some(join(&place.prefix, &path)),
                        reason,
                    )
                }
                None => LoadError {
                    file: PathBuf::from("<registry>"),
                    line: None,
                    document: None,
                    object: Some(key.to_string()),
                    path: Some(path),
                    reason,
                },
            };
            loader.errors.push(error);
        }
    }
    if loader.errors.is_empty() {
        Ok(loader.builder)
    } else {
        Err(LoadErrors(loader.errors))
    }
}

/// Reads and parses `path` (a file or a directory) into a snapshot.
pub fn load(path: &Path, generation: u64) -> Result<Snapshot, LoadErrors> {
    let files = read_sources(path)?;
    let builder = parse_sources(&files)?;
    Ok(builder.build(generation, files.into_iter().map(|f| f.path).collect()))
}

impl Snapshot {
    /// A snapshot (generation 1) from YAML text, e.g. for tests; errors name the file `<inline>`.
    pub fn from_yaml(text: &str) -> Result<Snapshot, LoadErrors> {
        let files = [SourceFile {
            path: PathBuf::from("<inline>"),
            text: text.to_string(),
        }];
        Ok(parse_sources(&files)?.build(1, Vec::new()))
    }
}

/// One document of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk<'a> {
    /// 0-based line of the chunk's first line (possibly a `---` marker).
    start_line: usize,
    /// 1-based line of its first content line.
    first_content: usize,
    text: &'a str,
}

pub(super) fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}

pub(super) fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// Splits a YAML stream into its non-empty documents.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 0;
    let mut first_content: Option<usize> = None;
    let mut has_marker = false;
    let mut offset = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let line = raw.trim_end_matches(['\n', '\r']);
        if is_marker(line, "---") {
            if first_content.is_some() || has_marker {
                if let Some(fc) = first_content {
                    chunks.push(Chunk {
                        start_line,
                        first_content: fc,
                        text: &text[start_byte..offset],
                    });
                }
                start_byte = offset;
                start_line = i;
            }
            has_marker = true;
            first_content = is_content(&line[3..]).then_some(i + 1);
        } else if is_marker(line, "...") {
            if let Some(fc) = first_content {
                chunks.push(Chunk {
                    start_line,
                    first_content: fc,
                    text: &text[start_byte..offset + raw.len()],
                });
            }
            start_byte = offset + raw.len();
            start_line = i + 1;
            first_content = None;
            has_marker = false;
        } else if first_content.is_none() && is_content(line) && !line.starts_with('%') {
            first_content = Some(i + 1);
        }
        offset += raw.len();
    }
    if let Some(fc) = first_content {
        chunks.push(Chunk {
            start_line,
            first_content: fc,
            text: &text[start_byte..],
        });
    }
    chunks
}

/// Strips what the line prefix already says from a serde_yaml_ng message: the ` at line L column C`
/// of its location and a leading `path: `.
fn yaml_reason(e: &serde_yaml_ng::Error, path: Option<&str>) -> String {
    let mut msg = e.to_string();
    if let Some(loc) = e.location() {
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(pos) = msg.find(&at) {
            msg.replace_range(pos..pos + at.len(), "");
        }
    }
    if let Some(path) = path {
        if let Some(rest) = msg.strip_prefix(path).and_then(|r| r.strip_prefix(": ")) {
            msg = rest.to_string();
        }
    }
    msg
}

struct Loader {
    builder: SnapshotBuilder,
    /// Where each object was first defined (`file:line`), for duplicate messages.
    origins: HashMap<ObjectKey, String>,
    /// Where each routing object was read, by (kind, namespace, name): errors found after
    /// every object is in ([`SnapshotBuilder::validate`]) point there.
    places: HashMap<(String, String, String), Place>,
    errors: Vec<LoadError>,
}

/// A document kept for the errors of [`SnapshotBuilder::validate`].
struct Place {
    file: PathBuf,
    index: usize,
    text: String,
    line_offset: usize,
    first_line: usize,
    /// `items[i]` inside a `List`, else empty.
    prefix: String,
    /// `Kind ns/name`.
    label: String,
}

/// The document being parsed, for error messages.
struct Doc<'a> {
    file: &'a Path,
    index: usize,
    /// The document's text; line numbers in it are relative to `line_offset`.
    text: &'a str,
    /// Lines of the file before the document.
    line_offset: usize,
    /// First line with content, relative to the document.
    first_line: usize,
}

impl Doc<'_> {
    fn error(
        &self,
        line: Option<usize>,
        object: Option<&str>,
        path: Option<String>,
        reason: String,
    ) -> LoadError {
        let path = path.filter(|p| !p.is_empty() && p != ".");
        let line = line
            .or_else(|| path.as_deref().and_then(|p| locate(self.text, p)))
            .unwrap_or(self.first_line)
            + self.line_offset;
        LoadError {
            file: self.file.to_path_buf(),
            line: Some(line),
            document: Some(self.index),
            object: object.map(str::to_string),
            path,
            reason,
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty() || path == ".") {
        (true, _) => path.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{path}"),
    }
}

impl Loader {
    fn file(&mut self, file: &Path, text: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, chunk) in split_documents(text).into_iter().enumerate() {
            let doc = Doc {
                file,
                index: i + 1,
                text: chunk.text,
                line_offset: chunk.start_line,
                first_line: chunk.first_content - chunk.start_line,
            };
            self.document(&doc);
        }
    }

    fn document(&mut self, doc: &Doc<'_>) {
        let value: Value = match serde_yaml_ng::from_str(doc.text) {
            Ok(v) => v,
            Err(e) => {
                let line = e.location().map(|l| l.line());
                self.errors
                    .push(doc.error(line, None, None, yaml_reason(&e, None)));
                return;
            }
        };
        if value.is_null() {
            return;
        }
        self.object(doc, &value, "", true);
    }

    /// One object: the document itself (`prefix` empty, `from_text`) or an item of a `List`.
    fn object(&mut self, doc: &Doc<'_>, value: &Value, prefix: &str, from_text: bool) {
        let here = if prefix.is_empty() {
            None
        } else {
            locate(doc.text, prefix)
        };
        let Some(obj) = value.as_object() else {
            let reason = format!(
                "expected a Kubernetes object (a mapping with apiVersion and kind), found {}",
                json_type(value)
            );
            let path = (!prefix.is_empty()).then(|| prefix.to_string());
            self.errors.push(doc.error(here, None, path, reason));
            return;
        };
        let field = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("");
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let meta = |k: &str| {
            obj.get("metadata")
                .and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let (name, namespace) = (meta("name"), meta("namespace"));
        for (k, v) in [("apiVersion", api_version), ("kind", kind)] {
            if v.is_empty() {
                let reason = match obj.get(k) {
                    None | Some(Value::Null) => "is required".to_string(),
                    Some(other) => format!("expected a string, found {}", json_type(other)),
                };
                self.errors
                    .push(doc.error(here, None, Some(join(prefix, k)), reason));
                return;
            }
        }
        let core_kind = api_version == "v1";
        let namespaced = !(core_kind && matches!(kind, "Namespace" | "Node"));
        let namespace = match namespace {
            None if core_kind && namespaced => Some("default"),
            None if kinds::namespaced(api_version, kind) => Some("default"),
            ns => ns.filter(|_| namespaced),
        };
        let label = match (name, namespace) {
            (Some(n), Some(ns)) => format!("{kind} {ns}/{n}"),
            (Some(n), None) => format!("{kind} {n}"),
            (None, _) => kind.to_string(),
        };
        let label = label.as_str();

        let object = match (api_version, kind) {
            ("v1", "Namespace") => self
                .typed::<core::Namespace>(doc, value, prefix, from_text, label)
                .map(|o| Object::Namespace(Box::new(o))),
            ("v1", "Node") => self
                .typed::<core::Node>(doc, value, prefix, from_text, label)
                .map(|o| Object::Node(Box::new(o))),
            ("v1", "Pod") => self
                .typed::<core::Pod>(doc, value, prefix, from_text, label)
                .map(|o| Object::Pod(Box::new(o))),
            ("v1", "Service") => self
                .typed::<core::Service>(doc, value, prefix, from_text, label)
                .map(|o| Object::Service(Box::new(o))),
            ("v1", k) if k.ends_with("List") => {
                match obj.get("items") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            self.object(doc, item, &join(prefix, &format!("items[{i}]")), false);
                        }
                    }
                    Some(other) => {
                        let reason = format!("expected a sequence, found {}", json_type(other));
                        let path = join(prefix, "items");
                        self.errors
                            .push(doc.error(None, Some(label), Some(path), reason));
                    }
                }
                return;
            }
            _ => Some(Object::Other(RawObject {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
                namespace: namespace.map(str::to_string),
                name: name.unwrap_or_default().to_string(),
                value: value.clone(),
            })),
        };
        let Some(object) = object else { return };

        let line = here.unwrap_or(doc.first_line) + doc.line_offset;
        let key = object_key(&object);
        if let Some(first) = self.origins.get(&key) {
            let reason = format!("duplicate {key}, first defined at {first}");
            let path = join(prefix, "metadata.name");
            self.errors
                .push(doc.error(None, Some(label), Some(path), reason));
            return;
        }
        let origin = format!("{}:{line}", doc.file.display());
        match self.builder.insert_from(object, Some(origin.clone())) {
            Ok(Inserted::Applied(key)) => {
                if let (Some(ns), kinds::Class::Known(_)) =
                    (&key.namespace, kinds::classify(&key.api_version, &key.kind))
                {
                    self.places
                        .entry((key.kind.clone(), ns.clone(), key.name.clone()))
                        .or_insert_with(|| Place {
                            file: doc.file.to_path_buf(),
                            index: doc.index,
                            text: doc.text.to_string(),
                            line_offset: doc.line_offset,
                            first_line: doc.first_line,
                            prefix: prefix.to_string(),
                            label: label.to_string(),
                        });
                }
                self.origins.insert(key, origin);
            }
            Ok(Inserted::NotApplied { key, reason }) => {
                self.builder.not_applied(NotApplied {
                    origin: format!("{origin}: document {}", doc.index),
                    object: key.to_string(),
                    reason,
                });
                self.origins.insert(key, origin);
            }
            Err(errors) => {
                for FieldError { path, reason } in errors {
                    let path = join(prefix, &path);
                    self.errors
                        .push(doc.error(None, Some(label), Some(path), reason));
                }
            }
        }
    }

    /// Deserializes a core object, from the document text when possible (exact line of a type
    /// error), else from the parsed value (line found by [`locate`]).
    fn typed<T: DeserializeOwned>(
        &mut self,
        doc: &Doc<'_>,
        value: &Value,
        prefix: &str,
        from_text: bool,
        label: &str,
    ) -> Option<T> {
        let result = if from_text {
            let de = serde_yaml_ng::Deserializer::from_str(doc.text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let line = inner.location().map(|l| l.line());
                (line, path.clone(), yaml_reason(&inner, Some(&path)))
            })
        } else {
            serde_path_to_error::deserialize(value.clone()).map_err(|e| {
                let path = e.path().to_string();
                (None, path, e.into_inner().to_string())
            })
        };
        match result {
            Ok(v) => Some(v),
            Err((line, path, reason)) => {
                let path = join(prefix, &path);
                self.errors
                    .push(doc.error(line, Some(label), Some(path), reason));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_documents_finds_starts() {
        let text = "# leading comment\n---\na: 1\n---\n# only a comment\n---\nb: 2\n...\nc: 3\n--- {d: 4}\n";
        let chunks = split_documents(text);
        let firsts: Vec<usize> = chunks.iter().map(|c| c.first_content).collect();
        assert_eq!(firsts, vec![3, 7, 9, 10]);
        assert_eq!(chunks[0].start_line, 0);
        assert_eq!(chunks[1].text, "---\nb: 2\n...\n");
        assert_eq!(chunks[2].text, "c: 3\n");
        assert_eq!(chunks[3].text, "--- {d: 4}\n");
    }

    #[test]
    fn split_documents_without_markers() {
        let chunks = split_documents("a: 1\nb:\n  - x\n");
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].first_content, 1);
        assert!(split_documents("# nothing\n---\n\n").is_empty());
    }
}
