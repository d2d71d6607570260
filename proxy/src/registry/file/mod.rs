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

use super::build::{
    convert, object_key, unknown_fields, Conversion, FieldError, Inserted, Object, ObjectKey,
    SnapshotBuilder,
};
use super::kinds;
use super::model::{Problem, RawObject, Snapshot};

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

/// Every document of `files` parsed and checked into a builder: each object on its own. An
/// invalid object is left out and reported (in [`Parsed::rejected`] and the builder's
/// `not_applied`), every other object applies; a security object left out fails closed.
#[derive(Debug)]
pub struct Parsed {
    pub builder: SnapshotBuilder,
    /// The objects left out, each with where and why.
    pub rejected: Vec<LoadError>,
    /// Objects applied with a likely mistake.
    pub warnings: Vec<LoadError>,
    /// The objects that apply (an invalid one's previous version included): what the next
    /// load falls back to.
    pub good: HashMap<ObjectKey, Conversion>,
}

/// Parses and checks every document of `files` (see [`Parsed`]).
pub fn parse_sources(files: &[SourceFile], previous: &HashMap<ObjectKey, Conversion>) -> Parsed {
    let mut loader = Loader {
        builder: SnapshotBuilder::new(),
        previous,
        good: HashMap::new(),
        origins: HashMap::new(),
        places: HashMap::new(),
        errors: Vec::new(),
    };
    for f in files {
        loader.file(&f.path, &f.text);
    }
    // Checks across objects, reported at the object they belong to. An object that fails
    // them keeps its previous version when that one passes.
    let mut cross = loader.builder.validate();
    // Cross-object problems name the object by group, kind, namespace and name: the same
    // object in any version.
    let same = |a: &ObjectKey, b: &ObjectKey| {
        a.kind == b.kind
            && a.namespace == b.namespace
            && a.name == b.name
            && a.api_version.split('/').next() == b.api_version.split('/').next()
    };
    let mut restored = Vec::new();
    for (key, _) in &cross {
        loader.good.retain(|k, _| !same(k, key));
        let prev = loader
            .previous
            .iter()
            .find(|(k, p)| same(k, key) && p.result.is_ok());
        if let Some((prev_key, prev)) = prev {
            if loader.builder.add(prev.clone()).is_ok() {
                restored.push((key.clone(), prev_key.clone(), prev.clone()));
            }
        }
    }
    if !restored.is_empty() {
        let again = loader.builder.validate();
        for (key, error) in &mut cross {
            let Some((_, prev_key, prev)) = restored.iter().find(|(k, ..)| k == key) else {
                continue;
            };
            if !again.iter().any(|(k, _)| k == key) {
                error.reason.push_str(KEPT);
                loader.good.insert(prev_key.clone(), prev.clone());
            }
        }
    }
    let at_object = |loader: &Loader, key: &ObjectKey, path: String, reason: String| {
        let place = key.namespace.as_ref().and_then(|ns| {
            loader
                .places
                .get(&(key.kind.clone(), ns.clone(), key.name.clone()))
        });
        match place {
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
        }
    };
    for (key, FieldError { path, reason }) in cross {
        let error = at_object(&loader, &key, path, reason);
        loader.errors.push(error);
    }
    let mut warnings = Vec::new();
    for (key, FieldError { path, reason }) in loader.builder.warnings() {
        warnings.push(at_object(&loader, &key, path, reason));
    }
    let Loader {
        mut builder,
        errors,
        good,
        ..
    } = loader;
    for e in &errors {
        builder.not_applied(e.problem());
    }
    for w in &warnings {
        builder.warning(w.problem());
    }
    Parsed {
        builder,
        rejected: errors,
        warnings,
        good,
    }
}

/// Said of an invalid object whose previous version stays in force.
const KEPT: &str = " (its previous version stays in force)";

impl LoadError {
    /// The same report as a [`Problem`] of the snapshot.
    pub fn problem(&self) -> Problem {
        let mut origin = self.file.display().to_string();
        if let Some(line) = self.line {
            origin.push_str(&format!(":{line}"));
        }
        if let Some(doc) = self.document {
            origin.push_str(&format!(": document {doc}"));
        }
        let reason = match &self.path {
            Some(path) => format!("{path}: {}", self.reason),
            None => self.reason.clone(),
        };
        Problem {
            origin,
            object: self.object.clone().unwrap_or_default(),
            reason,
        }
    }
}

/// Reads and parses `path` (a file or a directory) into a snapshot.
/// Objects left out are in the snapshot's `not_applied`.
pub fn load(path: &Path, generation: u64) -> Result<Snapshot, LoadErrors> {
    let files = read_sources(path)?;
    let parsed = parse_sources(&files, &HashMap::new());
    Ok(parsed
        .builder
        .build(generation, files.into_iter().map(|f| f.path).collect()))
}

impl Snapshot {
    /// A snapshot (generation 1) from YAML text where every object must be valid, e.g. for
    /// tests; errors name the file `<inline>`.
    pub fn from_yaml(text: &str) -> Result<Snapshot, LoadErrors> {
        let parsed = Snapshot::parse_yaml(text);
        if parsed.rejected.is_empty() {
            Ok(parsed.builder.build(1, Vec::new()))
        } else {
            Err(LoadErrors(parsed.rejected))
        }
    }

    /// YAML text parsed as a file source does, invalid objects left out and reported.
    pub fn parse_yaml(text: &str) -> Parsed {
        let files = [SourceFile {
            path: PathBuf::from("<inline>"),
            text: text.to_string(),
        }];
        parse_sources(&files, &HashMap::new())
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
fn yaml_reason(e: &serde_yaml_ng::Error, path: Option<&str>, line_offset: usize) -> String {
    let mut msg = e.to_string();
    if let Some(loc) = e.location() {
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(pos) = msg.find(&at) {
            msg.replace_range(pos..pos + at.len(), "");
        }
    }
    // Other positions in the message (`while parsing a block mapping at line 3 column 1`) are
    // the document's: make them the file's.
    msg = shift_lines(&msg, line_offset);
    if let Some(path) = path {
        if let Some(rest) = msg.strip_prefix(path).and_then(|r| r.strip_prefix(": ")) {
            msg = rest.to_string();
        }
    }
    msg
}

/// `… at line L column C …` with every L moved down by `offset` lines.
fn shift_lines(msg: &str, offset: usize) -> String {
    if offset == 0 {
        return msg.to_string();
    }
    const AT: &str = " at line ";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(pos) = rest.find(AT) {
        let after = &rest[pos + AT.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..pos + AT.len()]);
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// What a document that is not even YAML seems to be, from its `apiVersion:`, `kind:` and
/// `namespace:` lines: a security object there must fail closed though it cannot be read.
fn security_hint(text: &str) -> Option<(String, String, String)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let t = l.trim_start();
            let v = t.strip_prefix(name)?.strip_prefix(':')?;
            let v = v
                .split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(['"', '\'']);
            (!v.is_empty()).then(|| v.to_string())
        })
    };
    let api_version = field("apiVersion").unwrap_or_default();
    let kind = field("kind").unwrap_or_default();
    let security_kind = ["AuthorizationPolicy", "PeerAuthentication"]
        .iter()
        .any(|k| strsim::levenshtein(&kind.to_ascii_lowercase(), &k.to_ascii_lowercase()) <= 3);
    if !(api_version.starts_with(kinds::SECURITY_GROUP) || security_kind) {
        return None;
    }
    let namespace = field("namespace").unwrap_or_else(|| "default".to_string());
    let name = field("name").unwrap_or_default();
    let kind = if kind.is_empty() {
        "security object".to_string()
    } else {
        kind
    };
    Some((kind, namespace, name))
}

struct Loader<'p> {
    builder: SnapshotBuilder,
    /// The objects of the previous load that applied: an object whose new version is invalid
    /// keeps its previous version in force (not for security kinds: those fail closed).
    previous: &'p HashMap<ObjectKey, Conversion>,
    /// The objects of this load that apply, for the next one.
    good: HashMap<ObjectKey, Conversion>,
    /// Where each object was first defined (`file:line`), for duplicate messages.
    origins: HashMap<ObjectKey, String>,
    /// Where each routing object and Service was read, by (kind, namespace, name): errors
    /// and warnings found after every object is in ([`SnapshotBuilder::validate`]) point there.
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

impl Loader<'_> {
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
                let reason = yaml_reason(&e, None, doc.line_offset);
                if let Some((kind, namespace, name)) = security_hint(doc.text) {
                    self.builder.fail_closed_unreadable(
                        &kind,
                        &namespace,
                        &name,
                        &format!("not valid YAML: {reason}"),
                    );
                }
                self.errors.push(doc.error(line, None, None, reason));
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
        let rejected_from = self.errors.len();

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
            ("discovery.k8s.io/v1", "EndpointSlice") => self
                .typed::<k8s_openapi::api::discovery::v1::EndpointSlice>(
                    doc, value, prefix, from_text, label,
                )
                .map(|o| Object::EndpointSlice(Box::new(o))),
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
        let Some(object) = object else {
            let key = ObjectKey {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
                namespace: namespace.map(str::to_string),
                name: name.unwrap_or_default().to_string(),
            };
            self.keep_previous(&key, rejected_from);
            return;
        };

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
        let conversion = convert(&object, Some(origin.clone()));
        let kept = conversion.result.is_ok().then(|| conversion.clone());
        match self.builder.add(conversion) {
            Ok(Inserted::Applied(key)) => {
                if let Some(kept) = kept {
                    self.good.insert(key.clone(), kept);
                }
                let checked_later = key.kind == "Service"
                    || matches!(
                        kinds::classify(&key.api_version, &key.kind),
                        kinds::Class::Known(_)
                    );
                if let (Some(ns), true) = (&key.namespace, checked_later) {
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
                self.builder.not_applied(Problem {
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
                self.keep_previous(&key, rejected_from);
            }
        }
    }

    /// An invalid object of a kind that does not fail closed keeps its previous version in
    /// force, if it had one, as an edit the API server refused would; the errors reported for
    /// it from `errors_from` on say so.
    fn keep_previous(&mut self, key: &ObjectKey, errors_from: usize) {
        if self.origins.contains_key(key) {
            return; // a duplicate: the first one applies
        }
        if let kinds::Class::Known(
            kinds::Kind::AuthorizationPolicy | kinds::Kind::PeerAuthentication,
        )
        | kinds::Class::Unknown { security: true, .. } =
            kinds::classify(&key.api_version, &key.kind)
        {
            return;
        }
        let Some(prev) = self.previous.get(key).filter(|p| p.result.is_ok()) else {
            return;
        };
        if self.builder.add(prev.clone()).is_ok() {
            self.good.insert(key.clone(), prev.clone());
            self.origins
                .insert(key.clone(), "its previous version".to_string());
            for e in &mut self.errors[errors_from..] {
                e.reason.push_str(KEPT);
            }
        }
    }

    /// Deserializes a core object, from the document text when possible (exact line of a type
    /// error), else from the parsed value (line found by [`locate`]).
    fn typed<T: DeserializeOwned + Serialize>(
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
                (
                    line,
                    path.clone(),
                    yaml_reason(&inner, Some(&path), doc.line_offset),
                )
            })
        } else {
            serde_path_to_error::deserialize(value.clone()).map_err(|e| {
                let path = e.path().to_string();
                (None, path, e.into_inner().to_string())
            })
        };
        match result {
            Ok(v) => {
                // Fields the kind does not have (`contianers:`) are refused, as the API
                // server's strict field validation does.
                let unknown = unknown_fields::<T>(value, "");
                if unknown.is_empty() {
                    return Some(v);
                }
                for FieldError { path, reason } in unknown {
                    let path = join(prefix, &path);
                    self.errors
                        .push(doc.error(None, Some(label), Some(path), reason));
                }
                None
            }
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
