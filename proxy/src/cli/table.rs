//! Plain-text tables: columns fitted to their widest cell, or fixed widths for rows printed as
//! they come.

use std::io::Write;

/// One JSON object per line (`-o json`).
pub fn json_lines<T: serde::Serialize>(out: &mut impl Write, rows: &[T]) -> anyhow::Result<()> {
    for r in rows {
        serde_json::to_writer(&mut *out, r)?;
        writeln!(out)?;
    }
    Ok(())
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub fn format_duration(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

pub fn write_row(out: &mut impl Write, cells: &[String], widths: &[usize]) -> std::io::Result<()> {
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        if i + 1 == cells.len() {
            line.push_str(c);
        } else {
            let w = widths[i];
            line.push_str(&format!("{c:<w$}  "));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

pub fn print_table(out: &mut impl Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        write_row(out, r, &widths)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let mut out = Vec::new();
        print_table(
            &mut out,
            &[
                vec!["A".into(), "BB".into(), "C".into()],
                vec!["long".into(), "x".into(), "y".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A     BB  C\nlong  x   y\n"
        );
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(format_duration(0.25), "250µs");
        assert_eq!(format_duration(12.34), "12.3ms");
        assert_eq!(format_duration(2500.0), "2.50s");
    }
}
