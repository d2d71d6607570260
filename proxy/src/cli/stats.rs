//! `weft stats`: every destination's counters, in Envoy's names (`cluster.<cluster>.<stat>`).

use std::io::Write;

use super::flows::encode_query;
use super::{Output, StatsArgs};
use crate::admin::api::Stats;

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let mut query = vec![("format", "json".to_string())];
    if let Some(f) = args.filter {
        query.push(("filter", f));
    }
    if args.used_only {
        query.push(("usedonly", "1".to_string()));
    }
    let path = format!("/stats?{}", encode_query(&query));
    let resp = args.target.client().get(&path).await?;
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    if !status.is_success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&body).trim());
    }
    let stats: Stats = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("the node's answer is not what this weft understands: {e}"))?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            serde_json::to_writer(&mut out, &stats)?;
            writeln!(out)?;
        }
        Output::Table => out.write_all(stats.text().as_bytes())?,
    }
    Ok(())
}
