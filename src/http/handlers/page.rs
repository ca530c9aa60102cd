//! The fan's page: `GET /` and `GET /assets/*`, embedded in the binary.
//!
//! `build.rs` gives every asset a content-hashed name and a gzip twin at
//! compile time, so serving is a table lookup: no file system, no
//! compression per request. Hashed assets are cached for a year
//! (`immutable`); `/` is revalidated every time (`no-cache` + ETag, so a
//! new release reaches fans at once and an unchanged page costs a 304).
//! The Content-Security-Policy allows scripts, styles, workers and fetches
//! from this origin only — no inline script, nothing from elsewhere — and
//! images from here, `data:` (the empty favicon, which spares a request),
//! `blob:` (the QR codes) and https (activity images).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::http::error::ApiError;

/// One embedded file.
pub struct Asset {
    /// Its URL path.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its strong ETag (the content hash, quoted).
    pub etag: &'static str,
    /// The gzipped representation's ETag (a different representation, a different tag).
    pub etag_gzip: &'static str,
    /// Content-hashed: cacheable for a year.
    pub immutable: bool,
    /// The bytes.
    pub body: &'static [u8],
    /// The same, gzipped.
    pub gzip: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; worker-src 'self'; \
connect-src 'self'; img-src 'self' data: blob: https:; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'; object-src 'none'";

/// The asset at `path`, if any.
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Whether `path` is the page's (`/` or under `/assets/`).
pub fn is_page_path(path: &str) -> bool {
    path == "/" || path.starts_with("/assets/")
}

/// Answers `GET /` or `GET /assets/<hashed name>`.
pub fn serve(req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let asset = find(req.uri().path()).ok_or_else(|| {
        ApiError::not_found(
            "ROUTE_NOT_FOUND",
            format!(
                "no asset {} (names change with each release; reload /)",
                req.uri().path()
            ),
        )
    })?;
    let headers = req.headers();
    let gzip = accepts_gzip(headers);
    let etag = if gzip { asset.etag_gzip } else { asset.etag };
    let mut res = if etag_matches(headers, etag) {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        res
    } else if gzip {
        let mut res = Response::new(Full::new(Bytes::from_static(asset.gzip)));
        res.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        res
    } else {
        Response::new(Full::new(Bytes::from_static(asset.body)))
    };
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(header::ETAG, HeaderValue::from_static(etag));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !asset.immutable {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    Ok(res)
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        })
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        let index = find("/").expect("index.html");
        let html = std::str::from_utf8(index.body).unwrap();
        for asset in ASSETS.iter().filter(|a| a.immutable) {
            assert!(asset.path.starts_with("/assets/"), "{}", asset.path);
            assert!(!asset.gzip.is_empty() && asset.gzip.len() < asset.body.len());
        }
        for name in ["app.css", "app.js"] {
            let (stem, ext) = name.split_once('.').unwrap();
            let linked = ASSETS
                .iter()
                .find(|a| a.path.starts_with(&format!("/assets/{stem}.")) && a.path.ends_with(ext))
                .unwrap();
            assert!(html.contains(linked.path), "index.html does not link {}", linked.path);
        }
        assert!(!html.contains("{{"), "an unresolved asset name in index.html");
    }

    #[test]
    fn gzip_is_chosen_only_when_accepted() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("br, GZIP;q=0.8"));
        assert!(accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip;q=0, br"));
        assert!(!accepts_gzip(&h));
    }
}
