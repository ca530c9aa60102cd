//! Importing a million codes into the embedded store, in-process: what
//! `ticketd import` does after start-up (the whole command, start-up
//! included, is measured with `farm-bench` in docs/performance-log.md).
//!
//! - `import/generate_1m`: an activity with `generate = 1000000`;
//! - `import/codes_file_1m`: a 1,000,000-line `codes_file` (20 hex
//!   characters a line), reading and validating the file included.
//!
//! Each iteration imports into a fresh data directory. Run:
//! `cargo bench --bench import`.

use std::{io::Write, path::Path, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion};
use rand::RngCore;
use ticketd::{
    clock::now_ms,
    config::Config,
    store::{Access, Store},
};

const CODES: usize = 1_000_000;

fn config_text(dir: &Path, ticket: &str) -> String {
    format!(
        r#"
[storage]
path = "{}"
[[activity]]
id = "big"
name = "Big"
start_time = "+1h"
end_time = "+2h"
  [[activity.ticket]]
  id = "big-t"
  name = "T"
  {ticket}
"#,
        dir.join("data").display()
    )
}

/// Loads `config.toml` from `dir` (reading any codes file) and imports it
/// into a fresh data directory there.
fn import(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("data"));
    let config = Config::load(&dir.join("config.toml")).expect("valid config");
    let store = Store::open(&config, Access::Tool).expect("store");
    let report = store.import(&config, now_ms()).expect("import");
    assert_eq!(report.tickets[0].total, CODES);
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("import");
    group.sample_size(10).measurement_time(Duration::from_secs(30));

    let generated = tempfile::tempdir().unwrap();
    std::fs::write(
        generated.path().join("config.toml"),
        config_text(generated.path(), &format!("generate = {CODES}")),
    )
    .unwrap();
    group.bench_function("generate_1m", |b| b.iter(|| import(generated.path())));

    let listed = tempfile::tempdir().unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(listed.path().join("codes.txt")).unwrap());
    let mut rng = rand::thread_rng();
    for _ in 0..CODES {
        let mut bytes = [0u8; 10];
        rng.fill_bytes(&mut bytes);
        let line: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(file, "{line}").unwrap();
    }
    drop(file);
    std::fs::write(
        listed.path().join("config.toml"),
        config_text(listed.path(), "codes_file = \"codes.txt\""),
    )
    .unwrap();
    group.bench_function("codes_file_1m", |b| b.iter(|| import(listed.path())));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
