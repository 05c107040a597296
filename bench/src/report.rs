//! The report: a header naming the machine, then one markdown table per
//! measurement, aligned so that it reads as well in a terminal.

use std::time::Duration;

use crate::database::{Backend, Bench};

/// Milliseconds, with as many decimals as their size deserves.
pub fn ms(value: f64) -> String {
    if !value.is_finite() {
        "-".to_string()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            headers: headers.iter().map(|header| header.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, text: &str) {
        self.notes.push(text.to_string());
    }

    fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (index, cell) in row.iter().enumerate().take(columns) {
                widths[index] = widths[index].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let padded: Vec<String> = (0..columns)
                .map(|index| {
                    let cell = cells.get(index).map_or("", String::as_str);
                    format!("{cell:<width$}", width = widths[index])
                })
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut text = format!("### {}\n\n", self.title);
        text.push_str(&line(&self.headers));
        let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
        text.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        for row in &self.rows {
            text.push_str(&line(row));
        }
        for note in &self.notes {
            text.push_str(&format!("\n{note}\n"));
        }
        text.push('\n');
        text
    }
}

pub struct Report {
    machine: Vec<String>,
    tables: Vec<Table>,
}

impl Report {
    pub async fn new(bench: &Bench, backends: &[Backend]) -> Report {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines().find_map(|line| {
                    line.strip_prefix("model name")
                        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown CPU".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut machine = vec![
            format!("{cpus} CPUs ({model}), Linux {}", kernel.trim()),
            format!("load average at the start: {}", load_average()),
        ];
        if backends.contains(&Backend::Sqlite) {
            machine.push("SQLite: the daemon's settings (WAL, synchronous NORMAL); inserters use SQLite's defaults (synchronous FULL)".to_string());
        }
        if backends.contains(&Backend::Postgres) {
            let version = bench
                .postgres_version()
                .await
                .unwrap_or_else(|| "unknown version".to_string());
            machine.push(format!("PostgreSQL {version}, on the same machine"));
        }
        if backends.contains(&Backend::Mysql) {
            let version = bench
                .mysql_version()
                .await
                .unwrap_or_else(|| "unknown version".to_string());
            machine.push(format!("MariaDB {version}, on the same machine"));
        }
        Report {
            machine,
            tables: Vec::new(),
        }
    }

    pub fn add(&mut self, table: Table) {
        self.tables.push(table);
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.machine
            .push(format!("load average at the end: {}", load_average()));
        self.machine.push(format!(
            "benchmark run time: {:.0} s",
            elapsed.as_secs_f64()
        ));
    }

    pub fn render(&self) -> String {
        let mut text = String::from("## taskrunner benchmark\n\n");
        for line in &self.machine {
            text.push_str(&format!("- {line}\n"));
        }
        text.push('\n');
        for table in &self.tables {
            text.push_str(&table.render());
        }
        text
    }
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every number.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
