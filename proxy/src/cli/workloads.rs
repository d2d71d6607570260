//! `weft workloads`: the pods of the node, enrolled or not, with identities and cgroups.

use super::table::{json_lines, print_table, yes_no};
use super::{Output, WorkloadsArgs};
use crate::admin::api::WorkloadInfo;

pub async fn run(args: WorkloadsArgs) -> anyhow::Result<()> {
    let rows: Vec<WorkloadInfo> = args.target.client().get_json("/workloads").await?;
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        return json_lines(&mut out, &rows);
    }
    let mut t = vec![[
        "NAMESPACE",
        "POD",
        "IP",
        "IDENTITY",
        "READY",
        "ENROLLED",
        "CGROUP ID",
    ]
    .map(String::from)
    .to_vec()];
    let dash = || "-".to_string();
    for r in &rows {
        t.push(vec![
            r.namespace.clone(),
            r.pod.clone(),
            r.ip.map(|i| i.to_string()).unwrap_or_else(dash),
            r.identity.clone().unwrap_or_else(dash),
            yes_no(r.ready).into(),
            yes_no(r.enrolled).into(),
            r.cgroup_id.map(|i| i.to_string()).unwrap_or_else(dash),
        ]);
    }
    print_table(&mut out, &t)?;
    Ok(())
}
