//! Embeds the fan's page (`src/http/web/`): each asset gets a content-hashed
//! name (so browsers may cache it for a year), a gzip twin compressed once
//! here rather than per request, and an ETag. The table lands in
//! `$OUT_DIR/web_assets.rs`, included by `http::handlers::page`.

use std::{env, fmt::Write as _, fs, io::Write as _, path::Path};

use flate2::{write::GzEncoder, Compression};
use sha2::{Digest, Sha256};

/// `(file, content type)`, in dependency order: a file may name the hashed
/// name of any file before it as `{{file}}`.
const ASSETS: [(&str, &str); 4] = [
    ("pow.js", "text/javascript; charset=utf-8"),
    ("app.css", "text/css; charset=utf-8"),
    ("app.js", "text/javascript; charset=utf-8"),
    ("index.html", "text/html; charset=utf-8"),
];

fn main() {
    let src = Path::new("src/http/web");
    let out = Path::new(&env::var("OUT_DIR").unwrap()).join("web");
    fs::create_dir_all(&out).unwrap();
    let mut names: Vec<(String, String)> = Vec::new();
    let mut table = String::from("pub static ASSETS: &[Asset] = &[\n");
    for (file, content_type) in ASSETS {
        let path = src.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        let mut text = fs::read_to_string(&path).unwrap();
        for (from, to) in &names {
            text = text.replace(&format!("{{{{{from}}}}}"), to);
        }
        let hash: String = Sha256::digest(text.as_bytes())[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let (url, immutable) = if file == "index.html" {
            ("/".to_owned(), false)
        } else {
            let (stem, ext) = file.rsplit_once('.').unwrap();
            let hashed = format!("{stem}.{hash}.{ext}");
            names.push((file.to_owned(), format!("/assets/{hashed}")));
            (format!("/assets/{hashed}"), true)
        };
        let raw = out.join(file);
        fs::write(&raw, text.as_bytes()).unwrap();
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(text.as_bytes()).unwrap();
        let gz_path = out.join(format!("{file}.gz"));
        fs::write(&gz_path, gz.finish().unwrap()).unwrap();
        writeln!(
            table,
            "    Asset {{ path: {url:?}, content_type: {content_type:?}, etag: \"\\\"{hash}\\\"\", etag_gzip: \"\\\"{hash}-gz\\\"\", immutable: {immutable}, body: include_bytes!({:?}), gzip: include_bytes!({:?}) }},",
            raw.display().to_string(),
            gz_path.display().to_string(),
        )
        .unwrap();
    }
    table.push_str("];\n");
    fs::write(Path::new(&env::var("OUT_DIR").unwrap()).join("web_assets.rs"), table).unwrap();
    println!("cargo:rerun-if-changed=build.rs");
}
