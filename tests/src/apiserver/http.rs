//! The HTTP side: routing as kube-apiserver lays out its paths, the verbs, list pagination,
//! watch streams and content negotiation.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::patch;
use super::resources::{self, ResId, ReviewType, RESOURCES, SYSTEM_NAMESPACES};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{details, ApiError};
use super::store::{
    self, prefix, Change, ChangeType, Store, UpdateScope, WatchFrom, WatchMsg, WatchReg,
};
use super::table::{self, IncludeObject};
use super::tokenreview;
use super::{lock, Shared};

/// Response bodies: whole documents, or a watch's stream of lines.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The largest request body accepted (kube-apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// The watch duration when a client gives no `timeoutSeconds` (the real server picks one
/// between `--min-request-timeout` (1800 s) and twice that).
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;
const INCONSISTENT_CONTINUE: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter, or use the \
    continue token in this response to retrieve the remainder of the results. Continuing with \
    the provided token results in an inconsistent list - objects that were created, modified, \
    or deleted between the time the first chunk was returned and now may show up in the list.";

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn respond_json(code: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("JSON");
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .header("Audit-Id", store::new_uid())
        .body(full(body))
        .expect("response")
}

fn respond_error(e: &ApiError) -> Response<Body> {
    respond_json(e.code, &e.status())
}

/// Query parameters, percent-decoded.
pub(crate) struct Query(Vec<(String, String)>);

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    pub fn parse(q: &str) -> Self {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    fn str(&self, k: &str) -> &str {
        self.get(k).unwrap_or_default()
    }

    /// A boolean parameter as Go's `strconv.ParseBool` reads it.
    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(format!(
                "strconv.ParseBool: parsing \"{v}\": invalid syntax"
            ))),
        }
    }
}

/// How the client asked to see objects (`Accept`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Repr {
    Object,
    /// `as=Table` with the `meta.k8s.io` version.
    Table(&'static str),
    /// `as=PartialObjectMetadata[List]` with the `meta.k8s.io` version.
    Partial(&'static str),
}

fn negotiate(accept: &str) -> Repr {
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        if !matches!(media, "application/json" | "*/*" | "application/*" | "") {
            continue;
        }
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
        let param = |k: &str| params.iter().find(|(x, _)| *x == k).map(|(_, v)| *v);
        let version = match param("v") {
            Some("v1") | None => "v1",
            Some("v1beta1") => "v1beta1",
            Some(_) => continue,
        };
        match (param("as"), param("g")) {
            (None, _) => return Repr::Object,
            (Some("Table"), Some("meta.k8s.io")) => return Repr::Table(version),
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io")) => {
                return Repr::Partial(version)
            }
            _ => continue,
        }
    }
    Repr::Object
}

/// A request for a resource.
#[derive(Debug)]
struct Target {
    res: ResId,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    /// The `status` subresource.
    status: bool,
    /// A legacy `/watch/` path.
    watch_path: bool,
}

#[derive(Debug)]
enum Route {
    Version,
    Health,
    Api,
    Apis,
    Group(String),
    ResourceList(String, String),
    Resource(Target),
    /// A review type (create only, nothing stored).
    Review(&'static ReviewType),
    NotFound,
}

fn route(path: &str, store: &Store) -> Route {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        ["version"] => Route::Version,
        ["healthz" | "livez" | "readyz", ..] => Route::Health,
        ["api"] => Route::Api,
        ["apis"] => Route::Apis,
        ["api", "v1"] => Route::ResourceList(String::new(), "v1".into()),
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::ResourceList(g.to_string(), v.to_string()),
        ["apis", g, v, plural] if resources::find_review(g, v, plural).is_some() => {
            Route::Review(resources::find_review(g, v, plural).expect("found"))
        }
        ["api", "v1", rest @ ..] => resource_route("", "v1", rest, store),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest, store),
        _ => Route::NotFound,
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str], store: &Store) -> Route {
    let (watch_path, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let found =
        |plural: &str| resources::find(group, version, plural).filter(|&r| store.installed(r));
    let target = |res: ResId, namespace: Option<&str>, tail: &[&str]| {
        let status = match tail.get(1) {
            None => false,
            Some(&"status") if RESOURCES[res].status_subresource && tail.len() == 2 => true,
            Some(_) => return Route::NotFound,
        };
        Route::Resource(Target {
            res,
            version: version.to_string(),
            namespace: namespace.map(str::to_string),
            name: tail.first().map(|s| s.to_string()),
            status,
            watch_path,
        })
    };
    if let ["namespaces", ns, plural, tail @ ..] = rest {
        if let Some(res) = found(plural).filter(|&r| RESOURCES[r].namespaced) {
            return target(res, Some(ns), tail);
        }
    }
    match rest {
        [plural, tail @ ..] => match found(plural) {
            Some(res) if RESOURCES[res].namespaced && !tail.is_empty() => Route::NotFound,
            Some(res) => target(res, None, tail),
            None => Route::NotFound,
        },
        [] => Route::NotFound,
    }
}

/// The Kubernetes verb of a request (what audit logs and RBAC call it).
fn verb(method: &Method, route: &Route, watch: bool) -> String {
    let t = match route {
        Route::Resource(t) => t,
        Route::Review(_) if *method == Method::POST => return "create".into(),
        _ => return method.as_str().to_lowercase(),
    };
    let item = t.name.is_some();
    match *method {
        Method::GET if watch || t.watch_path => "watch",
        Method::GET if item => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if item => "delete",
        Method::DELETE => "deletecollection",
        _ => return method.as_str().to_lowercase(),
    }
    .to_string()
}

/// Serves one request.
pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.to_string());
    let query = Query::parse(parts.uri.query().unwrap_or_default());
    let route = route(&path, &lock(&shared.store));
    let watch = query.bool("watch").ok().flatten().unwrap_or(false);
    let verb = verb(&parts.method, &route, watch);
    {
        let mut log = lock(&shared.requests);
        if log.len() >= super::MAX_LOGGED {
            log.drain(..super::MAX_LOGGED / 2);
        }
        log.push((verb.clone(), path_and_query));
    }
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let repr = negotiate(accept);
    let result = match route {
        Route::Resource(t) => {
            resource(&shared, &verb, &t, &query, repr, &parts.headers, body).await
        }
        Route::Review(r) if parts.method == Method::POST => match read_body(body).await {
            Ok(body) => review(&shared, r, &content_type(&parts.headers), &body),
            Err(e) => Err(e),
        },
        Route::Review(_) => Err(ApiError::method_not_allowed()),
        _ if parts.method != Method::GET && parts.method != Method::HEAD => {
            Err(ApiError::method_not_allowed())
        }
        Route::Version => Ok(respond_json(200, &resources::version())),
        Route::Health => Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full("ok"))
            .expect("response")),
        Route::Api => {
            let addr = lock(&shared.address).to_string();
            Ok(respond_json(200, &resources::api_versions(&addr)))
        }
        Route::Apis => {
            let store = lock(&shared.store);
            let doc = resources::api_group_list(&|r| store.installed(r));
            Ok(respond_json(200, &doc))
        }
        Route::Group(g) => {
            let store = lock(&shared.store);
            resources::api_group_doc(&g, &|r| store.installed(r))
                .map(|d| respond_json(200, &d))
                .ok_or_else(ApiError::path_not_found)
        }
        Route::ResourceList(g, v) => {
            let store = lock(&shared.store);
            resources::api_resource_list(&g, &v, &|r| store.installed(r))
                .map(|d| respond_json(200, &d))
                .ok_or_else(ApiError::path_not_found)
        }
        Route::NotFound => Err(ApiError::path_not_found()),
    };
    result.unwrap_or_else(|e| respond_error(&e))
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// An object from a request body (JSON, or YAML when the content type says so).
fn decode(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    if !matches!(
        content_type,
        "application/json" | "application/yaml" | "*/*" | ""
    ) {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json, application/yaml (got {content_type})"
            ),
        )
        .with_details(json!({})));
    }
    let v: Value = if content_type.contains("yaml") {
        serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the request body is not an object"));
    }
    Ok(v)
}

/// An object as the client sees it at the URL's version: `apiVersion` of that version, and no
/// `kind`/`apiVersion` at all for items of a built-in type's list (as the real server encodes
/// typed lists; custom resources keep them).
fn present(res: ResId, obj: &Value, version: &str, with_type: bool) -> Value {
    let r = &RESOURCES[res];
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        if with_type || r.custom {
            m.insert("apiVersion".into(), json!(r.api_version(version)));
            m.insert("kind".into(), json!(r.kind));
        } else {
            m.remove("apiVersion");
            m.remove("kind");
        }
    }
    o
}

/// One object in the representation asked for.
fn present_one(t: &Target, obj: &Value, repr: Repr) -> Value {
    match repr {
        Repr::Object => present(t.res, obj, &t.version, true),
        Repr::Partial(v) => table::partial(obj, v),
        Repr::Table(v) => table::table(
            t.res,
            &[obj],
            json!({"resourceVersion": obj["metadata"]["resourceVersion"]}),
            IncludeObject::Metadata,
            v,
            &|o| present(t.res, o, &t.version, true),
        ),
    }
}

fn selectors(t: &Target, q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.str("labelSelector")).map_err(ApiError::bad_request)?;
    let mut fields =
        FieldSelector::parse(q.str("fieldSelector"), t.res).map_err(ApiError::bad_request)?;
    if let Some(name) = &t.name {
        fields = fields.and(FieldSelector::with_name(name));
    }
    Ok((labels, fields))
}

/// A resourceVersion parameter: empty or a number.
fn parse_rv(s: &str) -> Result<Option<u64>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: &Arc<Shared>,
    verb: &str,
    t: &Target,
    q: &Query,
    repr: Repr,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let allowed_on_status = matches!(verb, "get" | "update" | "patch");
    let item_verb = matches!(verb, "update" | "patch");
    if (t.status && !allowed_on_status)
        || (item_verb && t.name.is_none())
        || (verb == "create" && t.name.is_some())
    {
        return Err(ApiError::method_not_allowed());
    }
    match verb {
        "list" => list(shared, t, q, repr),
        "watch" => watch(shared, t, q, repr),
        "get" => get(shared, t, q, repr),
        "create" => {
            let body = read_body(body).await?;
            create(shared, t, q, &content_type(headers), &body)
        }
        "update" => {
            let body = read_body(body).await?;
            update(shared, t, &content_type(headers), &body)
        }
        "patch" => {
            let body = read_body(body).await?;
            patch(shared, t, &content_type(headers), &body)
        }
        "delete" => {
            let body = read_body(body).await?;
            delete(shared, t, q, &body)
        }
        "deletecollection" => delete_collection(shared, t, q),
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// `ValidateListOptions` (apimachinery) for lists.
fn validate_list(q: &Query) -> Result<(), ApiError> {
    let m = q.str("resourceVersionMatch");
    if !m.is_empty() {
        let field = "resourceVersionMatch";
        if q.str("resourceVersion").is_empty() {
            return Err(ApiError::invalid_options(
                field,
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if !q.str("continue").is_empty() {
            return Err(ApiError::invalid_options(
                field,
                "Forbidden: resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if m != "Exact" && m != "NotOlderThan" {
            return Err(ApiError::invalid_options(
                field,
                &format!("Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\", \"\""),
            ));
        }
        if m == "Exact" && q.str("resourceVersion") == "0" {
            return Err(ApiError::invalid_options(
                field,
                "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if q.get("sendInitialEvents").is_some() {
        return Err(ApiError::invalid_options(
            "sendInitialEvents",
            "Forbidden: sendInitialEvents is forbidden for list",
        ));
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
}

/// The opaque continue token: base64url (no padding) of `{"v":"meta.k8s.io/v1","rv":N,
/// "start":"<key after the prefix>\u0000"}`, as etcd3's store encodes it.
fn encode_continue(rv: i64, start: &str) -> String {
    let t = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start: start.into(),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&t).expect("JSON"))
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| invalid("incorrect encoding"))?;
    let t: ContinueToken =
        serde_json::from_slice(&raw).map_err(|_| invalid("incorrect encoding"))?;
    if t.v != "meta.k8s.io/v1" {
        return Err(invalid(&format!(
            "server does not recognize this encoding ({})",
            t.v
        )));
    }
    if t.start.is_empty() || t.start.contains("..") {
        return Err(invalid("continue start key is invalid"));
    }
    Ok(t)
}

fn list(shared: &Shared, t: &Target, q: &Query, repr: Repr) -> Result<Response<Body>, ApiError> {
    validate_list(q)?;
    let r = &RESOURCES[t.res];
    let (labels, fields) = selectors(t, q)?;
    let limit = match q.get("limit") {
        None | Some("") => None,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if n < 0 => return Err(ApiError::bad_request("limit must not be negative")),
            Ok(0) => None,
            Ok(n) => Some(n as usize),
            Err(_) => return Err(ApiError::bad_request(format!("invalid limit: {l}"))),
        },
    };
    let rv_param = q.str("resourceVersion");
    let cont = q.str("continue");
    let store = lock(&shared.store);
    let pre = prefix(t.res, t.namespace.as_deref());
    let (at, start) = if !cont.is_empty() {
        if !rv_param.is_empty() && rv_param != "0" {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let token = decode_continue(cont)?;
        let at = match token.rv {
            -1 => store.rv(),
            n if n <= 0 || n as u64 > store.rv() => {
                return Err(ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))
            }
            n => n as u64,
        };
        if at < store.floor() {
            let mut e = ApiError::expired(INCONSISTENT_CONTINUE);
            e.continue_token = Some(encode_continue(-1, &token.start));
            return Err(e);
        }
        (at, format!("{pre}{}", token.start))
    } else {
        let asked = parse_rv(rv_param)?;
        let m = q.str("resourceVersionMatch");
        let exact = m == "Exact" || (m.is_empty() && limit.is_some());
        match asked {
            Some(n) if n > 0 && n > store.rv() => {
                return Err(ApiError::too_large_rv(n, store.rv()))
            }
            Some(n) if n > 0 && exact => {
                if n < store.floor() {
                    return Err(ApiError::expired(
                        "The resourceVersion for the provided list is too old.",
                    ));
                }
                (n, pre.clone())
            }
            _ => (store.rv(), pre.clone()),
        }
    };
    let snapshot = store.snapshot(t.res, at).ok_or_else(|| {
        ApiError::expired("The resourceVersion for the provided list is too old.")
    })?;
    let mut items: Vec<&Value> = Vec::new();
    let mut token = None;
    let mut remaining = 0;
    let mut it = snapshot
        .range(start..)
        .take_while(|(k, _)| k.starts_with(&pre))
        .peekable();
    while let Some((k, o)) = it.next() {
        if !labels.matches(o) || !fields.matches(o) {
            continue;
        }
        items.push(o);
        if limit.is_some_and(|l| items.len() >= l) {
            if it.peek().is_some() {
                token = Some(encode_continue(
                    at as i64,
                    &format!("{}\u{0}", &k[pre.len()..]),
                ));
                remaining = it.count();
            }
            break;
        }
    }
    let mut meta = json!({"resourceVersion": at.to_string()});
    if let Some(tok) = &token {
        meta["continue"] = json!(tok);
        if labels.is_empty() && fields.is_empty() {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    let doc = match repr {
        Repr::Object => json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(&t.version),
            "metadata": meta,
            "items": items.iter().map(|o| present(t.res, o, &t.version, false)).collect::<Vec<_>>(),
        }),
        Repr::Partial(v) => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": format!("meta.k8s.io/{v}"),
            "metadata": meta,
            "items": items.iter().map(|o| table::partial(o, v)).collect::<Vec<_>>(),
        }),
        Repr::Table(v) => {
            let include = match q.get("includeObject") {
                Some("None") => IncludeObject::None,
                Some("Object") => IncludeObject::Object,
                _ => IncludeObject::Metadata,
            };
            table::table(t.res, &items, meta, include, v, &|o| {
                present(t.res, o, &t.version, true)
            })
        }
    };
    Ok(respond_json(200, &doc))
}

fn get(shared: &Shared, t: &Target, q: &Query, repr: Repr) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    let name = t.name.as_deref().unwrap_or_default();
    let store = lock(&shared.store);
    if let Some(n) = parse_rv(q.str("resourceVersion"))? {
        if n > store.rv() {
            return Err(ApiError::too_large_rv(n, store.rv()));
        }
    }
    let key = store::key(t.res, t.namespace.as_deref(), name);
    let obj = store
        .get(t.res, &key)
        .ok_or_else(|| ApiError::not_found(r, name))?;
    Ok(respond_json(200, &present_one(t, obj, repr)))
}

/// A watch stream: newline-delimited `{"type","object"}` events.
struct Watch {
    shared: Arc<Shared>,
    reg: WatchReg,
    res: ResId,
    version: String,
    prefix: String,
    labels: LabelSelector,
    fields: FieldSelector,
    repr: Repr,
    queue: VecDeque<Bytes>,
    bookmarks: bool,
    next_bookmark: Instant,
    deadline: Instant,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.shared.store).unwatch(self.reg.id);
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("JSON");
    b.push(b'\n');
    Bytes::from(b)
}

fn error_event(e: &ApiError) -> Bytes {
    line(&json!({"type": "ERROR", "object": e.status()}))
}

impl Watch {
    fn object(&self, obj: &Value) -> Value {
        match self.repr {
            Repr::Object => present(self.res, obj, &self.version, true),
            Repr::Partial(v) => table::partial(obj, v),
            Repr::Table(v) => table::table(
                self.res,
                &[obj],
                json!({"resourceVersion": obj["metadata"]["resourceVersion"]}),
                IncludeObject::Metadata,
                v,
                &|o| present(self.res, o, &self.version, true),
            ),
        }
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event a change means to this watch, as the watch cache filters: an object that stops
    /// matching the selectors is `DELETED` for it, one that starts matching `ADDED`.
    fn event(&self, ch: &Change) -> Option<Bytes> {
        if !ch.key.starts_with(&self.prefix) {
            return None;
        }
        let now = self.matches(&ch.object);
        let typ = match ch.typ {
            ChangeType::Added if now => "ADDED",
            ChangeType::Deleted if now => "DELETED",
            ChangeType::Modified => {
                let before = ch.prev.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                }
            }
            _ => return None,
        };
        Some(line(
            &json!({"type": typ, "object": self.object(&ch.object)}),
        ))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let r = &RESOURCES[self.res];
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(&json!({
            "type": "BOOKMARK",
            "object": {"kind": r.kind, "apiVersion": r.api_version(&self.version), "metadata": meta},
        }))
    }

    async fn next(mut self) -> Option<(Result<Frame<Bytes>, Infallible>, Self)> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some((Ok(Frame::data(b)), self));
            }
            if self.done {
                return None;
            }
            tokio::select! {
                msg = self.reg.rx.recv() => match msg {
                    Some(WatchMsg::Change(ch)) => {
                        if let Some(ev) = self.event(&ch) {
                            self.queue.push_back(ev);
                        }
                    }
                    Some(WatchMsg::Bookmark(rv)) => {
                        let b = self.bookmark(rv, false);
                        self.queue.push_back(b);
                    }
                    Some(WatchMsg::Expired(message)) => {
                        self.queue.push_back(error_event(&ApiError::expired(message)));
                        self.done = true;
                    }
                    Some(WatchMsg::Close) | None => return None,
                },
                _ = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    self.next_bookmark = Instant::now() + self.shared.bookmark_interval();
                    // Sent through the watch's own queue under the store lock: never ahead of
                    // a change with a lower resourceVersion.
                    let store = lock(&self.shared.store);
                    let _ = self.reg.tx.send(WatchMsg::Bookmark(store.rv()));
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }
}

fn stream_response(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .header("Audit-Id", store::new_uid())
        .body(body)
        .expect("response")
}

fn watch(
    shared: &Arc<Shared>,
    t: &Target,
    q: &Query,
    repr: Repr,
) -> Result<Response<Body>, ApiError> {
    // validateWatchOptions, with the WatchList feature enabled.
    let send_initial = q.bool("sendInitialEvents")?;
    let m = q.str("resourceVersionMatch");
    if send_initial.is_some() && m != "NotOlderThan" {
        return Err(ApiError::invalid_options(
            "resourceVersionMatch",
            "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    if !m.is_empty() {
        if send_initial.is_none() {
            return Err(ApiError::invalid_options(
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if m != "NotOlderThan" {
            return Err(ApiError::invalid_options(
                "resourceVersionMatch",
                &format!("Unsupported value: \"{m}\": supported values: \"NotOlderThan\""),
            ));
        }
    }
    let (labels, fields) = selectors(t, q)?;
    let timeout = match q.get("timeoutSeconds") {
        None | Some("") | Some("0") => DEFAULT_WATCH_TIMEOUT,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {s}")))?,
    };
    let bookmarks = q.bool("allowWatchBookmarks")?.unwrap_or(false);
    let asked = parse_rv(q.str("resourceVersion"))?;
    let mut store = lock(&shared.store);
    let current = store.rv();
    let from = match (send_initial, asked) {
        (Some(true), Some(n)) if n > current => return Err(ApiError::too_large_rv(n, current)),
        (Some(true), _) => WatchFrom::State,
        (Some(false), None | Some(0)) => WatchFrom::Now,
        (None, None | Some(0)) => WatchFrom::State,
        (_, Some(n)) if n > current => return Err(ApiError::too_large_rv(n, current)),
        (_, Some(n)) => WatchFrom::Rv(n),
    };
    let (reg, initial) = match store.watch(t.res, from) {
        Ok(w) => w,
        Err(floor) => {
            drop(store);
            let asked = asked.unwrap_or_default();
            let e = ApiError::expired(format!("too old resource version: {asked} ({floor})"));
            let frames = futures::stream::iter([Ok::<_, Infallible>(Frame::data(error_event(&e)))]);
            return Ok(stream_response(StreamBody::new(frames).boxed_unsync()));
        }
    };
    drop(store);
    let now = Instant::now();
    let mut w = Watch {
        shared: shared.clone(),
        reg,
        res: t.res,
        version: t.version.clone(),
        prefix: prefix(t.res, t.namespace.as_deref()),
        labels,
        fields,
        repr,
        queue: VecDeque::new(),
        bookmarks,
        next_bookmark: now + shared.bookmark_interval(),
        deadline: now + Duration::from_secs(timeout),
        done: false,
    };
    for ch in &initial {
        if let Some(ev) = w.event(ch) {
            w.queue.push_back(ev);
        }
    }
    if send_initial == Some(true) && bookmarks {
        let b = w.bookmark(current, true);
        w.queue.push_back(b);
    }
    let stream = futures::stream::unfold(w, Watch::next);
    Ok(stream_response(StreamBody::new(stream).boxed_unsync()))
}

/// Checks `apiVersion`/`kind` of a body against the URL and sets the stored ones.
fn check_type(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
    let r = &RESOURCES[t.res];
    let expected = r.api_version(&t.version);
    if let Some(av) = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        let (g, v) = resources::split_api_version(av);
        if g != r.group || !r.serves(v) {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({expected})"
            )));
        }
    }
    if let Some(k) = obj
        .get("kind")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        if k != r.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                r.kind
            )));
        }
    }
    obj["apiVersion"] = json!(r.api_version(r.preferred()));
    obj["kind"] = json!(r.kind);
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    Ok(())
}

/// Sets the namespace from the URL (400 if the body names another one).
fn check_namespace(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
    let meta = obj["metadata"].as_object_mut().expect("metadata");
    if !RESOURCES[t.res].namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    let url_ns = t.namespace.clone().unwrap_or_default();
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() && ns != url_ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            meta.insert("namespace".into(), json!(url_ns));
            Ok(())
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn validate_name(res: ResId, name: &str) -> Result<(), ApiError> {
    let r = &RESOURCES[res];
    let (ok, what) = if r.plural == "namespaces" {
        (
            is_dns_label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        )
    } else {
        (
            is_dns_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        )
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            r,
            name,
            "metadata.name",
            "FieldValueInvalid",
            &format!("Invalid value: \"{name}\": {what}"),
        ))
    }
}

/// The namespace of a namespaced write must exist (the NamespaceLifecycle admission plugin).
fn check_namespace_exists(store: &Store, t: &Target) -> Result<(), ApiError> {
    let Some(ns) = t
        .namespace
        .as_deref()
        .filter(|_| RESOURCES[t.res].namespaced)
    else {
        return Ok(());
    };
    let namespaces = resources::find("", "v1", "namespaces").expect("namespaces");
    if store.get(namespaces, ns).is_none() {
        return Err(ApiError::namespace_not_found(ns));
    }
    Ok(())
}

fn create_object(
    shared: &Shared,
    t: &Target,
    q: &Query,
    mut obj: Value,
) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    if r.namespaced && t.namespace.is_none() {
        return Err(ApiError::method_not_allowed());
    }
    check_type(t, &mut obj)?;
    check_namespace(t, &mut obj)?;
    let meta = obj["metadata"].as_object_mut().expect("metadata");
    for f in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "generation",
        "deletionTimestamp",
    ] {
        meta.remove(f);
    }
    let name = match meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(n) => n.to_string(),
        None => match meta
            .get("generateName")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            Some(g) => format!("{g}{}", store::name_suffix()),
            None => {
                return Err(ApiError::invalid(
                    r,
                    "",
                    "metadata.name",
                    "FieldValueRequired",
                    "Required value: name or generateName is required",
                ))
            }
        },
    };
    meta.insert("name".into(), json!(name));
    validate_name(t.res, &name)?;
    let mut store = lock(&shared.store);
    check_namespace_exists(&store, t)?;
    if q.str("dryRun") == "All" {
        let key = store::key(t.res, t.namespace.as_deref(), &name);
        if store.get(t.res, &key).is_some() {
            return Err(ApiError::already_exists(r, &name));
        }
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        meta.insert("uid".into(), json!(store::new_uid()));
        meta.insert(
            "creationTimestamp".into(),
            json!(store::rfc3339(std::time::SystemTime::now())),
        );
        return Ok(respond_json(201, &present(t.res, &obj, &t.version, true)));
    }
    let stored = store.create(t.res, obj)?;
    Ok(respond_json(
        201,
        &present(t.res, &stored, &t.version, true),
    ))
}

/// A review: the request object answered with its `status` (201, as a create), nothing kept.
fn review(
    shared: &Shared,
    r: &ReviewType,
    ct: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let mut obj = decode(ct, body)?;
    let expected = r.api_version();
    let field = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    if let Some(av) = field("apiVersion").filter(|av| *av != expected) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({expected})"
        )));
    }
    if let Some(k) = field("kind").filter(|k| k != r.kind) {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            r.kind
        )));
    }
    obj["apiVersion"] = json!(expected);
    obj["kind"] = json!(r.kind);
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    let answer = match r.kind {
        "TokenReview" => {
            let tokens = lock(&shared.tokens);
            let store = lock(&shared.store);
            tokenreview::review(&tokens, &store, obj)?
        }
        _ => return Err(ApiError::method_not_allowed()),
    };
    Ok(respond_json(201, &answer))
}

fn create(
    shared: &Shared,
    t: &Target,
    q: &Query,
    ct: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    create_object(shared, t, q, decode(ct, body)?)
}

fn scope(t: &Target) -> UpdateScope {
    if t.status {
        UpdateScope::Status
    } else if RESOURCES[t.res].status_subresource {
        UpdateScope::Main
    } else {
        UpdateScope::All
    }
}

/// Replaces the object at the URL with `obj` (checked against the URL).
fn replace(shared: &Shared, t: &Target, mut obj: Value) -> Result<Response<Body>, ApiError> {
    check_type(t, &mut obj)?;
    check_namespace(t, &mut obj)?;
    let url_name = t.name.clone().unwrap_or_default();
    let meta = obj["metadata"].as_object_mut().expect("metadata");
    match meta.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() && n != url_name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({url_name})"
            )))
        }
        _ => {
            meta.insert("name".into(), json!(url_name));
        }
    }
    let precondition = meta
        .get("resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let (stored, _) = lock(&shared.store).update(t.res, obj, precondition.as_deref(), scope(t))?;
    Ok(respond_json(
        200,
        &present(t.res, &stored, &t.version, true),
    ))
}

fn update(shared: &Shared, t: &Target, ct: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    replace(shared, t, decode(ct, body)?)
}

fn patch(shared: &Shared, t: &Target, ct: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    let name = t.name.clone().unwrap_or_default();
    let apply = ct == "application/apply-patch+yaml";
    let p: Value = match ct {
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/json-patch+json" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
        "application/apply-patch+yaml" => serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    let existing = {
        let store = lock(&shared.store);
        let key = store::key(t.res, t.namespace.as_deref(), &name);
        store.get(t.res, &key).cloned()
    };
    let Some(existing) = existing else {
        if apply && !t.status {
            let mut obj = p;
            if !obj.get("metadata").is_some_and(Value::is_object) {
                obj["metadata"] = json!({});
            }
            obj["metadata"]["name"] = json!(name);
            return create_object(shared, t, &Query(vec![]), obj);
        }
        return Err(ApiError::not_found(r, &name));
    };
    let mut doc = present(t.res, &existing, &t.version, true);
    match ct {
        "application/json-patch+json" => {
            patch::json_patch(&mut doc, &p).map_err(|e| ApiError::new(422, "Invalid", e))?
        }
        "application/apply-patch+yaml" => patch::apply_patch(&mut doc, &p),
        _ => patch::merge_patch(&mut doc, &p),
    }
    if !doc.get("metadata").is_some_and(Value::is_object) {
        doc["metadata"] = json!({});
    }
    doc["metadata"]["name"] = json!(name);
    if let Some(ns) = &t.namespace {
        doc["metadata"]["namespace"] = json!(ns);
    }
    replace(shared, t, doc)
}

fn delete(shared: &Shared, t: &Target, q: &Query, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    let name = t.name.clone().unwrap_or_default();
    let opts: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let dry_run = q.str("dryRun") == "All"
        || opts["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    if r.plural == "namespaces" && SYSTEM_NAMESPACES.contains(&name.as_str()) {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
        )
        .with_details(json!({"name": name, "kind": "namespaces"})));
    }
    let mut store = lock(&shared.store);
    let key = store::key(t.res, t.namespace.as_deref(), &name);
    let existing = store
        .get(t.res, &key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(r, &name))?;
    let meta = &existing["metadata"];
    if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str) {
        let have = meta["uid"].as_str().unwrap_or_default();
        if uid != have {
            return Err(ApiError::conflict(
                r,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
                ),
            ));
        }
    }
    if let Some(rv) = opts
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
    {
        let have = meta["resourceVersion"].as_str().unwrap_or_default();
        if rv != have {
            return Err(ApiError::conflict(
                r,
                &name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"
                ),
            ));
        }
    }
    let deleted = if dry_run {
        existing
    } else {
        store.remove(t.res, &key).expect("present")
    };
    drop(store);
    if r.delete_returns_object {
        return Ok(respond_json(
            200,
            &present(t.res, &deleted, &t.version, true),
        ));
    }
    let mut d = details(r, &name);
    d["uid"] = deleted["metadata"]["uid"].clone();
    Ok(respond_json(
        200,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d}),
    ))
}

fn delete_collection(shared: &Shared, t: &Target, q: &Query) -> Result<Response<Body>, ApiError> {
    let r = &RESOURCES[t.res];
    let (labels, fields) = selectors(t, q)?;
    let pre = prefix(t.res, t.namespace.as_deref());
    let mut store = lock(&shared.store);
    let keys: Vec<String> = store
        .objects(t.res)
        .filter(|o| labels.matches(o) && fields.matches(o))
        .map(|o| {
            store::key(
                t.res,
                o["metadata"]["namespace"].as_str(),
                o["metadata"]["name"].as_str().unwrap_or_default(),
            )
        })
        .filter(|k| k.starts_with(&pre))
        .filter(|k| !(r.plural == "namespaces" && SYSTEM_NAMESPACES.contains(&k.as_str())))
        .collect();
    let dry_run = q.str("dryRun") == "All";
    let mut items = Vec::new();
    for k in keys {
        let obj = if dry_run {
            store.get(t.res, &k).cloned()
        } else {
            store.remove(t.res, &k)
        };
        if let Some(o) = obj {
            items.push(present(t.res, &o, &t.version, false));
        }
    }
    let doc = json!({
        "kind": format!("{}List", r.kind),
        "apiVersion": r.api_version(&t.version),
        "metadata": {"resourceVersion": store.rv().to_string()},
        "items": items,
    });
    Ok(respond_json(200, &doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let store = Store::new();
        let Route::Resource(t) = route("/api/v1/namespaces/demo/pods/p1", &store) else {
            panic!()
        };
        assert_eq!(
            (t.namespace.as_deref(), t.name.as_deref(), t.status),
            (Some("demo"), Some("p1"), false)
        );
        let Route::Resource(t) = route("/api/v1/namespaces/demo", &store) else {
            panic!()
        };
        assert_eq!((t.namespace, t.name.as_deref()), (None, Some("demo")));
        let Route::Resource(t) = route("/api/v1/namespaces/demo/status", &store) else {
            panic!()
        };
        assert!(t.status);
        let Route::Resource(t) = route(
            "/apis/networking.istio.io/v1alpha3/watch/namespaces/a/virtualservices",
            &store,
        ) else {
            panic!()
        };
        assert!(t.watch_path && t.version == "v1alpha3");
        assert!(matches!(route("/api/v1/pods/p1", &store), Route::NotFound));
        assert!(matches!(
            route(
                "/apis/gateway.networking.k8s.io/v1alpha2/httproutes",
                &store
            ),
            Route::NotFound
        ));
        assert!(matches!(
            route(
                "/apis/gateway.networking.k8s.io/v1alpha2/grpcroutes",
                &store
            ),
            Route::Resource(_)
        ));
        let Route::Review(r) = route("/apis/authentication.k8s.io/v1/tokenreviews", &store) else {
            panic!()
        };
        assert_eq!(r.kind, "TokenReview");
        for path in [
            "/apis/authentication.k8s.io/v1/tokenreviews/x",
            "/apis/authentication.k8s.io/v1/namespaces/a/tokenreviews",
            "/apis/authentication.k8s.io/v1beta1/tokenreviews",
        ] {
            assert!(matches!(route(path, &store), Route::NotFound), "{path}");
        }
    }

    #[test]
    fn continue_tokens_round_trip() {
        let tok = encode_continue(42, "default/a\u{0}");
        let t = decode_continue(&tok).unwrap();
        assert_eq!((t.rv, t.start.as_str()), (42, "default/a\u{0}"));
        assert!(decode_continue("bm9wZQ").is_err());
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(
            negotiate("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"),
            Repr::Table("v1")
        );
        assert_eq!(
            negotiate("application/vnd.kubernetes.protobuf, */*"),
            Repr::Object
        );
        assert_eq!(
            negotiate("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
            Repr::Partial("v1")
        );
        assert_eq!(percent_decode("a%3Db+c"), "a=b c");
    }
}
