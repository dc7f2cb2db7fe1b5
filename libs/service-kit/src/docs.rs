//! A browsable API page that needs no internet: one self-contained HTML file rendering
//! `/openapi.json` (operations, parameters, schemas) with a "try it" form.

use actix_web::HttpResponse;

const PAGE: &str = include_str!("docs.html");

pub(crate) async fn docs_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        ))
        .body(PAGE)
}
