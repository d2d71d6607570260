//! `weft certs`: the workload certificates the node holds and when they expire.

use super::table::{json_lines, print_table};
use super::{CertsArgs, Output};
use crate::admin::api::CertInfo;

pub async fn run(args: CertsArgs) -> anyhow::Result<()> {
    let rows: Vec<CertInfo> = args.target.client().get_json("/certs").await?;
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        return json_lines(&mut out, &rows);
    }
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::format_description::well_known::Rfc3339;
    let mut t = vec![[
        "IDENTITY",
        "SERIAL",
        "NOT BEFORE",
        "NOT AFTER",
        "EXPIRES IN",
    ]
    .map(String::from)
    .to_vec()];
    for r in &rows {
        let left = (r.not_after - now).whole_seconds().max(0) as u64;
        t.push(vec![
            r.identity.clone(),
            r.serial.clone(),
            r.not_before.format(&fmt).unwrap_or_default(),
            r.not_after.format(&fmt).unwrap_or_default(),
            humantime::format_duration(std::time::Duration::from_secs(left)).to_string(),
        ]);
    }
    print_table(&mut out, &t)?;
    Ok(())
}
