//! The resource types the stand-in serves, and the discovery documents built from them.

use serde_json::{json, Value};

/// Index of a resource type in [`RESOURCES`].
pub(crate) type ResId = usize;

/// A column of the server-side `Table` rendering (`kubectl get`). `path` is a dotted path into
/// the object (arrays render as JSON, as the apiextensions table convertor does), or one of
/// the computed names starting with `@` (see `table.rs`).
#[derive(Debug)]
pub(crate) struct Column {
    pub name: &'static str,
    pub typ: &'static str,
    pub path: &'static str,
    /// 0: always shown; 1: only with `-o wide`.
    pub priority: u8,
    pub description: &'static str,
}

const fn col(name: &'static str, typ: &'static str, path: &'static str) -> Column {
    Column {
        name,
        typ,
        path,
        priority: 0,
        description: "",
    }
}

const fn wide(name: &'static str, typ: &'static str, path: &'static str) -> Column {
    Column {
        name,
        typ,
        path,
        priority: 1,
        description: "",
    }
}

/// One served resource type (all its versions share one storage).
#[derive(Debug)]
pub(crate) struct ResourceType {
    /// API group, `""` for core.
    pub group: &'static str,
    /// Served versions, the preferred (storage) one first.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Defined by a CustomResourceDefinition: served only while its CRD exists, list items keep
    /// `kind`/`apiVersion`, `metadata.generation` is maintained, DELETE answers a Status.
    pub custom: bool,
    /// Has a `status` subresource: writes to the main resource keep the stored status, writes to
    /// `/status` change only the status.
    pub status_subresource: bool,
    /// DELETE answers the deleted object (the registry's `ReturnDeletedObject`); otherwise a
    /// `Status` with `status: Success` and details.
    pub delete_returns_object: bool,
    /// Field selectors this type supports besides `metadata.name` and `metadata.namespace`.
    pub fields: &'static [&'static str],
    /// Table columns after `Name` (kubectl's server-side printing).
    pub columns: &'static [Column],
}

impl ResourceType {
    /// `apiVersion` for one of its versions.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// The preferred (storage) version.
    pub fn preferred(&self) -> &'static str {
        self.versions[0]
    }

    /// `pods`, or `authorizationpolicies.security.istio.io`: how error messages name it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The name of its CustomResourceDefinition (`<plural>.<group>`).
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.contains(&version)
    }
}

const AGE: Column = col("Age", "date", ".metadata.creationTimestamp");
const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];
const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];
const ISTIO_SECURITY: &[&str] = &["v1", "v1beta1"];
const ISTIO_NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];

/// Every resource type served. Core types first; the order is also discovery's.
pub(crate) static RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        custom: false,
        status_subresource: true,
        delete_returns_object: true,
        fields: &["status.phase"],
        columns: &[col("Status", "string", ".status.phase"), AGE],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        custom: false,
        status_subresource: true,
        delete_returns_object: false,
        fields: &["spec.unschedulable"],
        columns: &[
            col("Status", "string", "@node-status"),
            col("Roles", "string", "@node-roles"),
            AGE,
            col("Version", "string", ".status.nodeInfo.kubeletVersion"),
            wide("Internal-IP", "string", "@node-internal-ip"),
        ],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        custom: false,
        status_subresource: true,
        delete_returns_object: true,
        fields: POD_FIELDS,
        columns: &[
            col("Ready", "string", "@pod-ready"),
            col("Status", "string", "@pod-status"),
            col("Restarts", "string", "@pod-restarts"),
            AGE,
            wide("IP", "string", ".status.podIP"),
            wide("Node", "string", ".spec.nodeName"),
        ],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        custom: false,
        status_subresource: true,
        delete_returns_object: true,
        fields: &["spec.clusterIP", "spec.type"],
        columns: &[
            col("Type", "string", "@svc-type"),
            col("Cluster-IP", "string", ".spec.clusterIP"),
            col("External-IP", "string", "@svc-external-ip"),
            col("Port(s)", "string", "@svc-ports"),
            AGE,
            wide("Selector", "string", "@svc-selector"),
        ],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        custom: false,
        status_subresource: false,
        delete_returns_object: false,
        fields: EVENT_FIELDS,
        columns: &[
            col("Type", "string", ".type"),
            col("Reason", "string", ".reason"),
            col("Object", "string", "@event-object"),
            col("Message", "string", ".message"),
        ],
    },
    ResourceType {
        group: "apiextensions.k8s.io",
        versions: &["v1"],
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        categories: &["api-extensions"],
        custom: false,
        status_subresource: true,
        delete_returns_object: true,
        fields: &[],
        columns: &[col("Created At", "date", "@created-at")],
    },
    ResourceType {
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        custom: false,
        status_subresource: false,
        delete_returns_object: false,
        fields: &[],
        columns: &[
            col("AddressType", "string", ".addressType"),
            col("Ports", "string", "@eps-ports"),
            col("Endpoints", "string", "@eps-endpoints"),
            AGE,
        ],
    },
    ResourceType {
        group: "events.k8s.io",
        versions: &["v1"],
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        categories: &[],
        custom: false,
        status_subresource: false,
        delete_returns_object: false,
        fields: &[
            "reason",
            "type",
            "regarding.kind",
            "regarding.name",
            "regarding.namespace",
        ],
        columns: &[
            col("Type", "string", ".type"),
            col("Reason", "string", ".reason"),
            col("Note", "string", ".note"),
        ],
    },
    ResourceType {
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1beta1"],
        plural: "httproutes",
        singular: "httproute",
        kind: "HTTPRoute",
        namespaced: true,
        short_names: &[],
        categories: &["gateway-api"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[col("Hostnames", "string", ".spec.hostnames"), AGE],
    },
    ResourceType {
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1alpha2"],
        plural: "grpcroutes",
        singular: "grpcroute",
        kind: "GRPCRoute",
        namespaced: true,
        short_names: &[],
        categories: &["gateway-api"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[col("Hostnames", "string", ".spec.hostnames"), AGE],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_NETWORKING,
        plural: "destinationrules",
        singular: "destinationrule",
        kind: "DestinationRule",
        namespaced: true,
        short_names: &["dr"],
        categories: &["istio-io", "networking-istio-io"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[col("Host", "string", ".spec.host"), AGE],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_NETWORKING,
        plural: "serviceentries",
        singular: "serviceentry",
        kind: "ServiceEntry",
        namespaced: true,
        short_names: &["se"],
        categories: &["istio-io", "networking-istio-io"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[
            col("Hosts", "string", ".spec.hosts"),
            col("Location", "string", ".spec.location"),
            col("Resolution", "string", ".spec.resolution"),
            AGE,
        ],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_NETWORKING,
        plural: "virtualservices",
        singular: "virtualservice",
        kind: "VirtualService",
        namespaced: true,
        short_names: &["vs"],
        categories: &["istio-io", "networking-istio-io"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[
            col("Gateways", "string", ".spec.gateways"),
            col("Hosts", "string", ".spec.hosts"),
            AGE,
        ],
    },
    ResourceType {
        group: "security.istio.io",
        versions: ISTIO_SECURITY,
        plural: "authorizationpolicies",
        singular: "authorizationpolicy",
        kind: "AuthorizationPolicy",
        namespaced: true,
        short_names: &["ap"],
        categories: &["istio-io", "security-istio-io"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[col("Action", "string", ".spec.action"), AGE],
    },
    ResourceType {
        group: "security.istio.io",
        versions: ISTIO_SECURITY,
        plural: "peerauthentications",
        singular: "peerauthentication",
        kind: "PeerAuthentication",
        namespaced: true,
        short_names: &["pa"],
        categories: &["istio-io", "security-istio-io"],
        custom: true,
        status_subresource: true,
        delete_returns_object: false,
        fields: &[],
        columns: &[col("Mode", "string", ".spec.mtls.mode"), AGE],
    },
];

/// A resource served without storage: `create` only, answered from the request body and never
/// kept, listed or watched (kube-apiserver's reviews, such as `tokenreviews`).
#[derive(Debug)]
pub(crate) struct ReviewType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
}

impl ReviewType {
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }
}

/// Every review type served (cluster-scoped, as in kube-apiserver).
pub(crate) static REVIEWS: &[ReviewType] = &[ReviewType {
    group: "authentication.k8s.io",
    version: "v1",
    plural: "tokenreviews",
    singular: "tokenreview",
    kind: "TokenReview",
}];

/// The review type served at `group`/`version` as `plural`.
pub(crate) fn find_review(group: &str, version: &str, plural: &str) -> Option<&'static ReviewType> {
    REVIEWS
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// API groups (other than core) with their versions, preferred first, in discovery order.
pub(crate) static GROUPS: &[(&str, &[&str])] = &[
    ("apiextensions.k8s.io", &["v1"]),
    ("authentication.k8s.io", &["v1"]),
    ("discovery.k8s.io", &["v1"]),
    ("events.k8s.io", &["v1"]),
    ("gateway.networking.k8s.io", &["v1", "v1beta1", "v1alpha2"]),
    ("networking.istio.io", ISTIO_NETWORKING),
    ("security.istio.io", ISTIO_SECURITY),
];

/// Kinds `sync` always covers (the cluster state the harness describes), namespaces first.
pub(crate) const SYNCED_KINDS: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Node"),
    ("", "Pod"),
    ("", "Service"),
    ("discovery.k8s.io", "EndpointSlice"),
];

/// Namespaces the server creates at start and refuses to delete.
pub(crate) const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-node-lease", "kube-public", "kube-system"];

/// The resource type served at `group`/`version` as `plural`.
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<ResId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.plural == plural && r.serves(version))
}

/// Splits an `apiVersion` into (group, version).
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// The resource type of objects with this `apiVersion` and `kind`.
pub(crate) fn find_kind(api_version: &str, kind: &str) -> Option<ResId> {
    let (group, version) = split_api_version(api_version);
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.kind == kind && r.serves(version))
}

/// The resource type of `kind` (`Pod`) or `kind.group` (`Event.events.k8s.io`); a bare kind
/// served by several groups means the core one, else the first.
pub(crate) fn find_kind_name(kind: &str) -> Option<ResId> {
    if let Some((k, g)) = kind.split_once('.') {
        return RESOURCES.iter().position(|r| r.kind == k && r.group == g);
    }
    RESOURCES
        .iter()
        .position(|r| r.kind == kind && r.group.is_empty())
        .or_else(|| RESOURCES.iter().position(|r| r.kind == kind))
}

/// Resource types of a group.
pub(crate) fn in_group(group: &str) -> impl Iterator<Item = ResId> + '_ {
    (0..RESOURCES.len()).filter(move |&i| RESOURCES[i].group == group)
}

/// Whether `group` is one whose types come from CustomResourceDefinitions.
pub(crate) fn is_crd_group(group: &str) -> bool {
    in_group(group).any(|i| RESOURCES[i].custom)
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/version`.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": "v1.34.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api`.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

fn api_group(group: &str, versions: &[&str]) -> Value {
    let gv = |v: &str| json!({"groupVersion": format!("{group}/{v}"), "version": v});
    json!({
        "name": group,
        "versions": versions.iter().map(|v| gv(v)).collect::<Vec<_>>(),
        "preferredVersion": gv(versions[0]),
    })
}

/// `/apis/<group>` (APIGroup), if served.
pub(crate) fn api_group_doc(group: &str, installed: &dyn Fn(ResId) -> bool) -> Option<Value> {
    let versions = served_versions(group, installed)?;
    let mut doc = api_group(group, &versions);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// The versions of `group` with at least one installed resource type, preferred first.
fn served_versions(group: &str, installed: &dyn Fn(ResId) -> bool) -> Option<Vec<&'static str>> {
    let (_, all) = GROUPS.iter().find(|(g, _)| *g == group)?;
    let versions: Vec<&str> = all
        .iter()
        .copied()
        .filter(|v| {
            in_group(group).any(|i| installed(i) && RESOURCES[i].serves(v))
                || REVIEWS.iter().any(|r| r.group == group && r.version == *v)
        })
        .collect();
    (!versions.is_empty()).then_some(versions)
}

/// `/apis` (APIGroupList): groups whose resource types are installed.
pub(crate) fn api_group_list(installed: &dyn Fn(ResId) -> bool) -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .filter_map(|(g, _)| Some(api_group(g, &served_versions(g, installed)?)))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/api/v1` or `/apis/<group>/<version>` (APIResourceList), if served.
pub(crate) fn api_resource_list(
    group: &str,
    version: &str,
    installed: &dyn Fn(ResId) -> bool,
) -> Option<Value> {
    let reviews = REVIEWS
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": false,
                "kind": r.kind,
                "verbs": ["create"],
            })
        });
    let resources: Vec<Value> = in_group(group)
        .filter(|&i| installed(i) && RESOURCES[i].serves(version))
        .flat_map(|i| {
            let r = &RESOURCES[i];
            let mut main = json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": VERBS,
            });
            if !r.short_names.is_empty() {
                main["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                main["categories"] = json!(r.categories);
            }
            let mut docs = vec![main];
            if r.status_subresource {
                docs.push(json!({
                    "name": format!("{}/status", r.plural),
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
            docs
        })
        .chain(reviews)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The CustomResourceDefinition that installs a custom resource type (without the metadata the
/// server assigns).
pub(crate) fn crd_object(id: ResId) -> Value {
    let r = &RESOURCES[id];
    let names = json!({
        "plural": r.plural,
        "singular": r.singular,
        "kind": r.kind,
        "listKind": format!("{}List", r.kind),
        "shortNames": r.short_names,
        "categories": r.categories,
    });
    let printer_columns: Vec<Value> = r
        .columns
        .iter()
        .map(|c| json!({"name": c.name, "type": c.typ, "jsonPath": c.path}))
        .collect();
    let versions: Vec<Value> = r
        .versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v,
                "served": true,
                "storage": i == 0,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer_columns,
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": r.crd_name()},
        "spec": {
            "group": r.group,
            "names": names,
            "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
            "versions": versions,
        },
        "status": {
            "acceptedNames": names,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
            ],
            "storedVersions": [r.preferred()],
        },
    })
}

/// The custom resource type a CustomResourceDefinition named `name` installs.
pub(crate) fn custom_type_of_crd(name: &str) -> Option<ResId> {
    RESOURCES
        .iter()
        .position(|r| r.custom && r.crd_name() == name)
}
