//! A pod's workload, named as Istio names it, for the labels of the standard metrics
//! (`*_workload`, `*_app`, `*_version`, `*_canonical_service`, `*_canonical_revision`) and the
//! access logs: the same pod gets the same names from weft as from Istio's proxies.
//!
//! - **Workload name and kind** (Istio's `kube.GetWorkloadMetaFromPod`): only a pod whose
//!   name was generated (`metadata.generateName`) and that has a controller
//!   (`ownerReferences[].controller: true`) is named after its controller; any other pod is
//!   its own workload (kind `Pod`). From the controller:
//!   - a ReplicaSet whose name ends with the pod's `pod-template-hash` label: the Deployment,
//!     its name without `-<hash>`; with `rollouts-pod-template-hash` instead: the Argo
//!     Rollout, the same way;
//!   - a ReplicationController of a pod labelled `deploymentconfig`: the OpenShift
//!     DeploymentConfig of that name;
//!   - a Job named `<name>-<8 to 10 digits>` (what a CronJob names its Jobs): the CronJob
//!     `<name>`;
//!   - any other controller (StatefulSet, DaemonSet, a ReplicaSet made by hand, a Job, …):
//!     itself.
//!
//!   The label `service.istio.io/workload-name`, when present, replaces the name (not the
//!   kind).
//! - **Canonical service** (Istio's `labels.CanonicalService`): the first of the labels
//!   `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app` the pod has (even
//!   empty), else the workload name. **Canonical revision**: the first of
//!   `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else
//!   `latest`.
//! - **App and version**, as Istio's metadata exchange reads them from the pod's labels
//!   (`istio/proxy` `extensions/common/metadata_object`): `app.kubernetes.io/name`, else `app`;
//!   `app.kubernetes.io/version`, else `version`; empty counts as absent, and absent is
//!   `None` (`unknown` in metrics). ztunnel reports the canonical service and revision there
//!   instead; a caller that wants its labels takes those.

use serde::Serialize;

use super::model::Pod;

/// Label naming a pod's canonical service (Istio's `service.istio.io/canonical-name`).
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
/// Label naming a pod's canonical revision (`service.istio.io/canonical-revision`).
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
/// Label that names a pod's workload whatever its owner (`service.istio.io/workload-name`).
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// The labels the canonical service is read from, first found wins.
const NAME_LABELS: [&str; 3] = [CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app"];
/// The labels the canonical revision is read from, first found wins.
const REVISION_LABELS: [&str; 3] = [
    CANONICAL_REVISION_LABEL,
    "app.kubernetes.io/version",
    "version",
];

/// A pod's workload: what Istio's metrics and logs call it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// `reviews-v1` for the pods of Deployment `reviews-v1`, the pod's own name for a pod
    /// without a controller.
    pub name: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `ReplicationController`,
    /// `Job`, `CronJob`, `Rollout`, `DeploymentConfig`, `Pod` (no controller), or `Other` (a
    /// controller of another kind; the pod's [`Pod::owner`] has it).
    pub kind: &'static str,
    /// `app.kubernetes.io/name`, else `app`.
    pub app: Option<String>,
    /// `app.kubernetes.io/version`, else `version`.
    pub version: Option<String>,
    pub canonical_service: String,
    pub canonical_revision: String,
}

/// The workload of `pod`, derived as Istio does (see the module documentation).
pub fn workload_of(pod: &Pod) -> Workload {
    let (mut name, kind) = controller_of(pod);
    if let Some(n) = pod.labels.get(WORKLOAD_NAME_LABEL) {
        name = n.clone();
    }
    let first = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k)).cloned();
    let non_empty = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| pod.labels.get(*k).filter(|v| !v.is_empty()))
            .cloned()
    };
    Workload {
        canonical_service: first(&NAME_LABELS).unwrap_or_else(|| name.clone()),
        canonical_revision: first(&REVISION_LABELS).unwrap_or_else(|| "latest".to_string()),
        app: non_empty(&["app.kubernetes.io/name", "app"]),
        version: non_empty(&["app.kubernetes.io/version", "version"]),
        name,
        kind,
    }
}

/// The workload's name and kind from the pod's controller (Istio's
/// `kube.GetDeployMetaFromPod`).
fn controller_of(pod: &Pod) -> (String, &'static str) {
    let controller = pod
        .owner
        .as_ref()
        .filter(|o| o.controller && pod.generate_name.is_some());
    let Some(owner) = controller else {
        return (pod.name.clone(), "Pod");
    };
    let label = |key: &str| pod.labels.get(key).filter(|v| !v.is_empty());
    let owner_name = owner.name.as_str();
    // A ReplicaSet named `<deployment>-<hash>`: Istio tests the hash without the dash and
    // strips it with the dash (so `web7f9c` with hash `7f9c` stays `web7f9c`).
    let template = |hash_label: &str| {
        label(hash_label)
            .filter(|hash| owner_name.ends_with(hash.as_str()))
            .map(|hash| {
                let dashed = format!("-{hash}");
                owner_name.strip_suffix(&dashed).unwrap_or(owner_name)
            })
    };
    let (name, kind) = match owner.kind.as_str() {
        "ReplicaSet" => {
            if let Some(deployment) = template("pod-template-hash") {
                (deployment, "Deployment")
            } else if let Some(rollout) = template("rollouts-pod-template-hash") {
                (rollout, "Rollout")
            } else {
                (owner_name, "ReplicaSet")
            }
        }
        "ReplicationController" => match label("deploymentconfig") {
            Some(config) => (config.as_str(), "DeploymentConfig"),
            None => (owner_name, "ReplicationController"),
        },
        "Job" => match cron_job_of(owner_name) {
            Some(cron_job) => (cron_job, "CronJob"),
            None => (owner_name, "Job"),
        },
        "StatefulSet" => (owner_name, "StatefulSet"),
        "DaemonSet" => (owner_name, "DaemonSet"),
        "Deployment" => (owner_name, "Deployment"),
        "CronJob" => (owner_name, "CronJob"),
        _ => (owner_name, "Other"),
    };
    if name.is_empty() {
        return (pod.name.clone(), kind);
    }
    (name.to_string(), kind)
}

/// The CronJob of a Job named as CronJobs name theirs: Istio's `(.+)-\d{8,10}$` (the scheduled
/// time in minutes since the epoch).
fn cron_job_of(job: &str) -> Option<&str> {
    let (cron_job, time) = job.rsplit_once('-')?;
    let scheduled = (8..=10).contains(&time.len()) && time.bytes().all(|b| b.is_ascii_digit());
    (scheduled && !cron_job.is_empty()).then_some(cron_job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::model::{Labels, Owner, QosClass};

    fn pod(name: &str, labels: &[(&str, &str)], owner: Option<(&str, &str)>) -> Pod {
        Pod {
            namespace: "back".into(),
            name: name.into(),
            uid: "u-1".into(),
            node_name: None,
            ip: None,
            ips: Vec::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
            service_account: "default".into(),
            ready: true,
            phase: Some("Running".into()),
            qos: QosClass::BestEffort,
            host_network: false,
            ports: Vec::new(),
            probe_ports: Vec::new(),
            owner: owner.map(|(kind, name)| Owner {
                kind: kind.into(),
                name: name.into(),
                controller: true,
            }),
            // What every controller does: `<owner>-`, the API server adds the rest.
            generate_name: owner.map(|(_, name)| format!("{name}-")),
        }
    }

    fn name_kind(p: &Pod) -> (String, &'static str) {
        let w = workload_of(p);
        (w.name, w.kind)
    }

    #[test]
    fn a_deployments_pods_are_named_after_it_without_the_template_hash() {
        let p = pod(
            "reviews-v1-7d4b9c8f6d-x2kqp",
            &[("app", "reviews"), ("pod-template-hash", "7d4b9c8f6d")],
            Some(("ReplicaSet", "reviews-v1-7d4b9c8f6d")),
        );
        assert_eq!(name_kind(&p), ("reviews-v1".into(), "Deployment"));

        // Dashes in the Deployment's name stay; only the last `-<hash>` goes.
        let p = pod(
            "my-web-app-5-6f8d9-abcde",
            &[("pod-template-hash", "6f8d9")],
            Some(("ReplicaSet", "my-web-app-5-6f8d9")),
        );
        assert_eq!(name_kind(&p), ("my-web-app-5".into(), "Deployment"));

        // Istio checks the suffix without the dash and strips it with the dash.
        let p = pod(
            "web6f8d9-abcde",
            &[("pod-template-hash", "6f8d9")],
            Some(("ReplicaSet", "web6f8d9")),
        );
        assert_eq!(name_kind(&p), ("web6f8d9".into(), "Deployment"));

        // An Argo Rollout's ReplicaSets work the same way, with their own label.
        let p = pod(
            "canary-7c9f8-abcde",
            &[("rollouts-pod-template-hash", "7c9f8")],
            Some(("ReplicaSet", "canary-7c9f8")),
        );
        assert_eq!(name_kind(&p), ("canary".into(), "Rollout"));
    }

    #[test]
    fn a_replica_set_no_deployment_made_is_the_workload_itself() {
        // Made by hand: no template hash.
        let p = pod("frontend-abcde", &[], Some(("ReplicaSet", "frontend")));
        assert_eq!(name_kind(&p), ("frontend".into(), "ReplicaSet"));
        // A hash label that is not the ReplicaSet's suffix.
        let p = pod(
            "frontend-abcde",
            &[("pod-template-hash", "1234")],
            Some(("ReplicaSet", "frontend")),
        );
        assert_eq!(name_kind(&p), ("frontend".into(), "ReplicaSet"));
        // An empty hash is no hash.
        let p = pod(
            "frontend-abcde",
            &[("pod-template-hash", "")],
            Some(("ReplicaSet", "frontend")),
        );
        assert_eq!(name_kind(&p), ("frontend".into(), "ReplicaSet"));
    }

    #[test]
    fn a_cron_jobs_pods_are_named_after_it() {
        let p = pod(
            "nightly-report-28391040-q7x2z",
            &[],
            Some(("Job", "nightly-report-28391040")),
        );
        assert_eq!(name_kind(&p), ("nightly-report".into(), "CronJob"));
        // 8 to 10 digits after the last dash, nothing else.
        for (job, want) in [
            ("backup-12345678", ("backup", "CronJob")),
            ("backup-1234567890", ("backup", "CronJob")),
            ("backup-1234567", ("backup-1234567", "Job")),
            ("backup-12345678901", ("backup-12345678901", "Job")),
            ("backup-1234567a", ("backup-1234567a", "Job")),
            ("-12345678", ("-12345678", "Job")),
            ("migrate-db", ("migrate-db", "Job")),
        ] {
            let p = pod(&format!("{job}-abcde"), &[], Some(("Job", job)));
            assert_eq!(name_kind(&p), (want.0.to_string(), want.1), "{job}");
        }
    }

    #[test]
    fn other_controllers_are_the_workload() {
        let p = pod("web-0", &[], Some(("StatefulSet", "web")));
        assert_eq!(name_kind(&p), ("web".into(), "StatefulSet"));
        let p = pod("agent-x7k2p", &[], Some(("DaemonSet", "agent")));
        assert_eq!(name_kind(&p), ("agent".into(), "DaemonSet"));
        let p = pod("old-x7k2p", &[], Some(("ReplicationController", "old")));
        assert_eq!(name_kind(&p), ("old".into(), "ReplicationController"));
        // An OpenShift DeploymentConfig names its ReplicationControllers' pods.
        let p = pod(
            "shop-3-x7k2p",
            &[("deploymentconfig", "shop")],
            Some(("ReplicationController", "shop-3")),
        );
        assert_eq!(name_kind(&p), ("shop".into(), "DeploymentConfig"));
        // A custom controller: its name, kind Other.
        let p = pod("set-x7k2p", &[], Some(("CloneSet", "set")));
        assert_eq!(name_kind(&p), ("set".into(), "Other"));
    }

    #[test]
    fn a_pod_without_a_controller_is_its_own_workload() {
        let p = pod("debug", &[], None);
        assert_eq!(name_kind(&p), ("debug".into(), "Pod"));

        // Owned but not controlled (an owner for garbage collection only).
        let mut p = pod("debug", &[], Some(("ConfigMap", "cm")));
        p.owner.as_mut().unwrap().controller = false;
        assert_eq!(name_kind(&p), ("debug".into(), "Pod"));

        // Controlled, but its name was not generated: Istio does not look at the owner.
        let mut p = pod("web-0", &[], Some(("StatefulSet", "web")));
        p.generate_name = None;
        assert_eq!(name_kind(&p), ("web-0".into(), "Pod"));
    }

    #[test]
    fn the_workload_name_label_renames_but_keeps_the_kind() {
        let p = pod(
            "reviews-v1-7d4b9-x2kqp",
            &[
                (WORKLOAD_NAME_LABEL, "reviews"),
                ("pod-template-hash", "7d4b9"),
            ],
            Some(("ReplicaSet", "reviews-v1-7d4b9")),
        );
        let w = workload_of(&p);
        assert_eq!((w.name.as_str(), w.kind), ("reviews", "Deployment"));
        // The canonical service falls back to the renamed workload.
        assert_eq!(w.canonical_service, "reviews");
    }

    #[test]
    fn canonical_names_follow_istios_label_precedence() {
        let all = [
            (CANONICAL_NAME_LABEL, "canonical"),
            ("app.kubernetes.io/name", "k8s-name"),
            ("app", "app"),
            (CANONICAL_REVISION_LABEL, "rev"),
            ("app.kubernetes.io/version", "k8s-version"),
            ("version", "v1"),
        ];
        let owner = Some(("StatefulSet", "db"));
        let w = workload_of(&pod("db-0", &all, owner));
        assert_eq!(
            (w.canonical_service.as_str(), w.canonical_revision.as_str()),
            ("canonical", "rev")
        );
        assert_eq!(
            (w.app.as_deref(), w.version.as_deref()),
            (Some("k8s-name"), Some("k8s-version"))
        );

        let w = workload_of(&pod("db-0", &all[1..], owner));
        assert_eq!(w.canonical_service, "k8s-name");
        let w = workload_of(&pod("db-0", &all[2..], owner));
        assert_eq!(
            (w.canonical_service.as_str(), w.canonical_revision.as_str()),
            ("app", "rev")
        );
        assert_eq!(w.app.as_deref(), Some("app"));
        let w = workload_of(&pod("db-0", &all[4..], owner));
        assert_eq!(
            (w.canonical_service.as_str(), w.canonical_revision.as_str()),
            ("db", "k8s-version")
        );
        assert_eq!((w.app, w.version.as_deref()), (None, Some("k8s-version")));
        let w = workload_of(&pod("db-0", &all[5..], owner));
        assert_eq!(
            (w.canonical_revision.as_str(), w.version.as_deref()),
            ("v1", Some("v1"))
        );

        // No label at all: the workload name and `latest`; no app, no version.
        let w = workload_of(&pod("db-0", &[], owner));
        assert_eq!(
            w,
            Workload {
                name: "db".into(),
                kind: "StatefulSet",
                app: None,
                version: None,
                canonical_service: "db".into(),
                canonical_revision: "latest".into(),
            }
        );

        // A label present but empty counts for the canonical names (Istio looks the key up)
        // and not for app and version (the metadata exchange skips empty values).
        let w = workload_of(&pod(
            "db-0",
            &[
                ("app.kubernetes.io/name", ""),
                ("app", "db-app"),
                ("version", ""),
            ],
            owner,
        ));
        assert_eq!(
            (w.canonical_service.as_str(), w.canonical_revision.as_str()),
            ("", "")
        );
        assert_eq!((w.app.as_deref(), w.version), (Some("db-app"), None));
    }
}
