//! The on-call dashboard: server-rendered HTML (maud) with one small embedded script and style
//! sheet, no assets from elsewhere. Login required; viewers see, operators act. Every
//! state-changing form carries the session's CSRF token and a required reason, and every action
//! lands in the audit log shown here.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use contracts::{BreakerState, Outcome, SagaState};
use maud::{html, Markup, DOCTYPE};
use serde::{Deserialize, Serialize};
use service_kit::{valid_id, ApiError, ApiResult};

use crate::actions::{self, Actor};
use crate::api::{self, SagaQuery};
use crate::auth::{self, Attempt, Session, Sessions};
use crate::scheduler_client::BreakerReport;
use crate::{audit, readmodel, AppState};

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

/// Largest dashboard form body: a reason of [`actions::REASON_MAX_CHARS`] characters of four
/// bytes each is three times that once form-encoded (actix's default limit is 16 KiB).
const FORM_LIMIT: usize = 64 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::FormConfig::default().limit(FORM_LIMIT))
        .route("/", web::get().to(root))
        .route("/assets/app.css", web::get().to(css))
        .route("/assets/app.js", web::get().to(js))
        .route("/login", web::get().to(login_page))
        .route("/login", web::post().to(login))
        .route("/logout", web::post().to(logout))
        .route("/dashboard", web::get().to(overview_page))
        .route("/dashboard/overview.json", web::get().to(overview_json))
        .route("/dashboard/sagas", web::get().to(sagas_page))
        .route("/dashboard/sagas/{deliveryId}", web::get().to(saga_page))
        .route("/dashboard/sagas/{deliveryId}/retry", web::post().to(retry))
        .route(
            "/dashboard/sagas/{deliveryId}/compensate",
            web::post().to(compensate),
        )
        .route("/dashboard/parked", web::get().to(parked_page))
        .route(
            "/dashboard/parked/{messageId}/redrive",
            web::post().to(redrive),
        )
        .route("/dashboard/audit", web::get().to(audit_page));
}

fn page(markup: Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "same-origin"))
        .body(markup.into_string())
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location.to_owned()))
        .finish()
}

fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Supervisor" }
                link rel="stylesheet" href="/assets/app.css";
            }
            body {
                header.top {
                    a.brand href="/dashboard" { "Drone delivery · Supervisor" }
                    @if let Some(s) = session {
                        nav {
                            a href="/dashboard" { "Overview" }
                            a href="/dashboard/sagas" { "Sagas" }
                            a href="/dashboard/parked" { "Parked" }
                            a href="/dashboard/audit" { "Audit log" }
                        }
                        div.who {
                            span #who { (s.user) " · " (s.role.as_str()) }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
                script src="/assets/app.js" {}
            }
        }
    }
}

fn flash(q: &Flash) -> Markup {
    html! {
        @if let Some(m) = &q.done { p.flash.ok role="status" { (m) } }
        @if let Some(m) = &q.error { p.flash.err role="alert" { (m) } }
    }
}

#[derive(Debug, Default, Deserialize)]
struct Flash {
    done: Option<String>,
    error: Option<String>,
}

async fn root() -> HttpResponse {
    see_other("/dashboard")
}

async fn css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "max-age=300"))
        .body(CSS)
}

async fn js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "max-age=300"))
        .body(JS)
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    next: Option<String>,
    failed: Option<String>,
    /// Seconds to wait after too many failures.
    throttled: Option<u64>,
    busy: Option<String>,
}

/// What the login page says above the form.
enum LoginNotice {
    None,
    Failed,
    /// Too many failures: seconds to wait.
    Throttled(u64),
    /// Every password-check slot is busy.
    Busy,
}

/// "5 seconds", "3 minutes": what a person reads.
fn wait_text(secs: u64) -> String {
    match secs {
        1 => "1 second".to_owned(),
        s if s < 120 => format!("{s} seconds"),
        s => format!("{} minutes", s.div_ceil(60)),
    }
}

/// The login page with a fresh form token (double-submit cookie: there is no session yet).
fn login_form(next: &str, notice: &LoginNotice, secure_cookies: bool) -> HttpResponse {
    let token = auth::random_token();
    let body = html! {
        form #login.card method="post" action="/login" {
            input type="hidden" name="csrf" value=(token);
            input type="hidden" name="next" value=(next);
            @match notice {
                LoginNotice::None => {}
                LoginNotice::Failed => { p.flash.err role="alert" { "Wrong user name or password." } }
                LoginNotice::Throttled(secs) => {
                    p #throttled.flash.err role="alert" {
                        "Too many failed sign-ins for this user name or from this address. "
                        "Wait " (wait_text(*secs)) ", then try again."
                    }
                }
                LoginNotice::Busy => {
                    p #busy.flash.err role="alert" {
                        "Too many sign-ins are being checked right now. Try again in a moment."
                    }
                }
            }
            label { "User name" input #username name="username" autocomplete="username" required autofocus; }
            label { "Password" input #password type="password" name="password" autocomplete="current-password" required; }
            button #sign-in type="submit" { "Sign in" }
        }
    };
    let mut res = page(layout("Sign in", None, body));
    if let Ok(v) = header::HeaderValue::from_str(&auth::cookie(
        auth::LOGIN_COOKIE,
        &token,
        600,
        secure_cookies,
    )) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

async fn login_page(q: web::Query<LoginQuery>, sessions: web::Data<Sessions>) -> HttpResponse {
    let notice = match (&q.throttled, &q.busy, &q.failed) {
        // Bounded: the number comes from the address bar.
        (Some(secs), _, _) => LoginNotice::Throttled((*secs).clamp(1, 86_400)),
        (None, Some(_), _) => LoginNotice::Busy,
        (None, None, Some(_)) => LoginNotice::Failed,
        (None, None, None) => LoginNotice::None,
    };
    login_form(
        &auth::safe_next(q.next.as_deref()),
        &notice,
        sessions.secure_cookies,
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

/// Back to the login page, which says why (`notice`), after a refused attempt; `Retry-After`
/// tells tools the same as the page tells people. (A `429`/`503` page of our own would be
/// replaced by a bare problem+json on the way out: every error response of the service is one.)
fn back_to_login(notice: &str, next: &str, retry_after: u64) -> HttpResponse {
    let mut res = see_other(&format!("/login?{notice}&next={}", auth::urlencode(next)));
    res.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after));
    res
}

/// A client that asks for JSON (a tool, a script) gets problem+json instead of the login page.
fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("json") && !a.contains("text/html"))
}

/// Failed logins and logouts change nothing to act on, so a broken audit log does not stop them;
/// it is logged loudly instead.
async fn audit_best_effort(db: &sea_orm::DatabaseConnection, entry: audit::Entry<'_>) {
    let (action, actor) = (entry.action, entry.actor.to_owned());
    if let Err(e) = audit::record(db, entry).await {
        tracing::error!(error = %e, action, actor, "writing the audit log failed");
    }
}

async fn login(
    req: HttpRequest,
    form: web::Form<LoginForm>,
    sessions: web::Data<Sessions>,
) -> ApiResult<HttpResponse> {
    use subtle::ConstantTimeEq;
    let cookie = auth::cookie_value(&req, auth::LOGIN_COOKIE).unwrap_or_default();
    if cookie.is_empty() || !bool::from(cookie.as_bytes().ct_eq(form.csrf.as_bytes())) {
        return Err(ApiError::Forbidden(
            "the login form expired; reload the page".into(),
        ));
    }
    let json = wants_json(&req);
    let next = auth::safe_next(form.next.as_deref());
    let name = form.username.trim();
    let address = auth::client_address(&req, &sessions.login);
    let keys = crate::throttle::Keys::new(name, &address);
    let user = match auth::attempt(&sessions, name, &form.password, &keys).await? {
        Attempt::Verified(user) => user,
        // Throttled and busy attempts are not audited one by one: a flood would flood the log.
        // The failure that starts a wait is (below).
        Attempt::Throttled { retry_after } => {
            tracing::warn!(user = %name, address = %address, retry_after, "dashboard login throttled");
            if json {
                return Err(ApiError::RateLimited { retry_after });
            }
            return Ok(back_to_login(
                &format!("throttled={retry_after}"),
                &next,
                retry_after,
            ));
        }
        Attempt::Busy => {
            tracing::warn!(user = %name, address = %address, "dashboard login refused: password checks busy");
            if json {
                return Err(ApiError::unavailable(
                    "login-busy",
                    "too many sign-ins are being checked right now; try again in a moment",
                    1,
                ));
            }
            return Ok(back_to_login("busy=1", &next, 1));
        }
        Attempt::Wrong { wait } => {
            tracing::warn!(user = %name, address = %address, wait, "failed dashboard login");
            let outcome = match wait {
                Some(secs) => format!("failed; the next attempt waits {secs} s"),
                None => "failed".to_owned(),
            };
            audit_best_effort(
                &sessions.db,
                audit::Entry {
                    actor: name,
                    role: "",
                    action: "login",
                    target: &address,
                    reason: "",
                    outcome: &outcome,
                },
            )
            .await;
            if json {
                return Err(ApiError::Unauthorized("wrong user name or password".into()));
            }
            return Ok(see_other(&format!(
                "/login?failed=1&next={}",
                auth::urlencode(&next)
            )));
        }
    };
    // A session is an action like the others: its audit row first, or no session.
    let entry = audit::record(
        &sessions.db,
        audit::Entry {
            actor: &user.name,
            role: &user.role,
            action: "login",
            target: &address,
            reason: "",
            outcome: audit::PENDING,
        },
    )
    .await
    .map_err(|e| {
        tracing::error!(error = %e, user = %user.name, "audit log not writable: login refused");
        ApiError::unavailable(
            "audit-unavailable",
            "the audit log cannot be written, so no one can sign in; try again later",
            5,
        )
    })?;
    let s = auth::start_session(&sessions.db, &user, sessions.ttl).await?;
    if let Err(e) = audit::finish(&sessions.db, entry, "ok").await {
        tracing::error!(error = %e, user = %user.name, "recording a login's outcome failed");
    }
    tracing::info!(user = %s.user_name, role = %s.role, "dashboard login");
    let mut res = see_other(&next);
    let h = res.headers_mut();
    for c in [
        auth::cookie(
            auth::SESSION_COOKIE,
            &s.id,
            sessions.ttl.num_seconds(),
            sessions.secure_cookies,
        ),
        auth::cookie(auth::LOGIN_COOKIE, "", 0, sessions.secure_cookies),
    ] {
        if let Ok(v) = header::HeaderValue::from_str(&c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    Ok(res)
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    req: HttpRequest,
    session: Session,
    form: web::Form<CsrfForm>,
    sessions: web::Data<Sessions>,
) -> ApiResult<HttpResponse> {
    session.check_csrf(&form.csrf)?;
    // Ending a session never waits for the audit log.
    audit_best_effort(
        &sessions.db,
        audit::Entry {
            actor: &session.user,
            role: session.role.as_str(),
            action: "logout",
            target: &auth::client_address(&req, &sessions.login),
            reason: "",
            outcome: "ok",
        },
    )
    .await;
    auth::logout(&sessions.db, &session.id).await;
    let mut res = see_other("/login");
    if let Ok(v) = header::HeaderValue::from_str(&auth::cookie(
        auth::SESSION_COOKIE,
        "",
        0,
        sessions.secure_cookies,
    )) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(res)
}

fn counter(id: &str, label: &str, value: String) -> Markup {
    html! {
        div.counter {
            span.value data-counter=(id) id=(format!("counter-{id}")) { (value) }
            span.label { (label) }
        }
    }
}

/// One downstream service on the overview's "Downstream services" line, over every caller (the
/// Scheduler replicas and the Supervisor itself): the worst of their breakers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct DownstreamService {
    service: String,
    state: BreakerState,
    /// The earliest next probe of the callers whose breaker is open.
    next_probe_at: Option<DateTime<Utc>>,
    /// Calls refused without being made, over every caller, since each started.
    rejected: u64,
    /// The callers whose breaker is not closed (`scheduler-0`, `supervisor`).
    not_closed_on: Vec<String>,
}

/// The "Downstream services" line: each service, and the callers that could not tell.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct DownstreamLine {
    services: Vec<DownstreamService>,
    errors: Vec<String>,
}

/// Folds every caller's breakers into one entry per service, in the order first reported.
fn downstream_line(reports: &[BreakerReport]) -> DownstreamLine {
    let mut line = DownstreamLine::default();
    for report in reports {
        let breakers = match &report.breakers {
            Ok(b) => b,
            Err(e) => {
                line.errors.push(format!("{}: {e}", report.source));
                continue;
            }
        };
        for b in breakers {
            let i = match line.services.iter().position(|s| s.service == b.service) {
                Some(i) => i,
                None => {
                    line.services.push(DownstreamService {
                        service: b.service.clone(),
                        state: BreakerState::Closed,
                        next_probe_at: None,
                        rejected: 0,
                        not_closed_on: Vec::new(),
                    });
                    line.services.len() - 1
                }
            };
            let s = &mut line.services[i];
            s.rejected += b.rejected_total;
            // Ordered by severity: closed < half-open < open.
            if b.state > s.state {
                s.state = b.state;
            }
            if b.state != BreakerState::Closed {
                s.not_closed_on.push(report.source.clone());
            }
            if let Some(at) = b.next_probe_at {
                s.next_probe_at = Some(s.next_probe_at.map_or(at, |t| t.min(at)));
            }
        }
    }
    line
}

/// "package OPEN (next probe 12:00:05 UTC, 340 rejected; on scheduler-0)"; `app.js` writes the
/// same on refresh.
fn downstream_text(s: &DownstreamService) -> String {
    let state = match s.state {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "half-open",
        BreakerState::Open => "OPEN",
    };
    let mut details = Vec::new();
    if s.state == BreakerState::Open {
        if let Some(t) = s.next_probe_at {
            details.push(format!("next probe {}", t.format("%H:%M:%S UTC")));
        }
    }
    if s.rejected > 0 {
        details.push(format!("{} rejected", s.rejected));
    }
    let mut text = format!("{} {state}", s.service);
    if !details.is_empty() || !s.not_closed_on.is_empty() {
        text.push_str(" (");
        text.push_str(&details.join(", "));
        if !s.not_closed_on.is_empty() {
            if !details.is_empty() {
                text.push_str("; ");
            }
            text.push_str("on ");
            text.push_str(&s.not_closed_on.join(", "));
        }
        text.push(')');
    }
    text
}

fn downstream_markup(line: &DownstreamLine) -> Markup {
    html! {
        p #downstream.downstream {
            strong { "Downstream services: " }
            span #downstream-services {
                @for (i, s) in line.services.iter().enumerate() {
                    @if i > 0 { " · " }
                    span class=(format!("breaker breaker-{}", s.state.as_str())) data-service=(s.service) data-state=(s.state.as_str()) {
                        (downstream_text(s))
                    }
                }
                @if line.services.is_empty() { span.muted { "not known" } }
            }
            " "
            span #downstream-errors.muted hidden[line.errors.is_empty()] {
                @if !line.errors.is_empty() { "(not told by " (line.errors.join("; ")) ")" }
            }
        }
    }
}

/// The overview's JSON: the counters, and the "Downstream services" line.
#[derive(Serialize)]
struct OverviewPage {
    #[serde(flatten)]
    overview: actions::Overview,
    downstream: DownstreamLine,
}

async fn overview_page(session: Session, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let o = actions::overview(&state).await?;
    let downstream = downstream_line(&state.scheduler.breakers(&state.downstream).await);
    let stuck = readmodel::search(
        &state.db,
        &readmodel::Search {
            stuck: true,
            limit: 20,
            ..Default::default()
        },
    )
    .await?;
    let recent = audit::recent(&state.db, 10).await?;
    let body = html! {
        section #counters.counters data-refresh-ms=(state.settings.refresh_ms) {
            (counter("acceptedPerSecond", "accepted/s", format!("{:.1}", o.accepted_per_second)))
            (counter("scheduledPerSecond", "scheduled/s", format!("{:.1}", o.scheduled_per_second)))
            (counter("failed", "failed", o.failed.to_string()))
            (counter("compensating", "compensating", o.compensating.to_string()))
            (counter("compensated", "compensated", o.compensated.to_string()))
            (counter("compensationFailed", "compensation failed", o.compensation_failed.to_string()))
            (counter("parked", "parked (needs a person)", o.parked.to_string()))
            (counter("stuck", "stuck", o.stuck.to_string()))
            (counter("stalledPartitions", "stalled partitions", o.stalled_partitions.to_string()))
            (counter("progressing", "sagas in progress", optional(o.progressing)))
            (counter("waiting", "sagas waiting", optional(o.waiting)))
        }
        p.muted { "Updated " span #updated-at { (o.at.format("%H:%M:%S UTC")) } ", refreshing by itself." }
        (downstream_markup(&downstream))
        h2 { "Partitions" }
        p.muted {
            "Lag is the age of the oldest booking not yet started, read from the log. A partition is flagged stalled when its lease has expired (its owner is not alive) or that booking is older than "
            (o.stall_after_secs) " s."
        }
        p.flash.err #partitions-error role="alert" hidden[o.partitions_error.is_none()] {
            (o.partitions_error.as_deref().unwrap_or_default())
        }
        table #partitions {
            thead { tr { th { "partition" } th { "owner" } th { "owner alive" } th { "lease expires" } th { "checkpoint" } th { "lag (s)" } th { "status" } } }
            tbody {
                @for p in &o.partitions {
                    (partition_row(p))
                }
            }
        }
        h2 { "Waiting sagas" }
        p.muted { "Running sagas parked until a wake-up time (no drone free yet, a back-off), apart from those in progress, by the step they wait to run and why." }
        p.flash.err #waiting-error role="alert" hidden[o.waiting_error.is_none()] {
            (o.waiting_error.as_deref().unwrap_or_default())
        }
        table #waiting {
            thead { tr { th { "step" } th { "reason" } th { "sagas" } th { "next wake-up" } th { "for example" } th { "last error" } } }
            tbody {
                @for r in &o.waiting_reasons {
                    tr {
                        td { (r.step) } td { (r.reason) } td { (r.count) }
                        td { (r.next_wake_at.map_or("–".to_owned(), |t| t.format("%H:%M:%S UTC").to_string())) }
                        td { @if r.example_delivery_id.is_empty() { "–" } @else { a href=(format!("/dashboard/sagas/{}", r.example_delivery_id)) { (r.example_delivery_id) } } }
                        td { (r.last_error.as_deref().unwrap_or("–")) }
                    }
                }
            }
        }
        h2 { "Sagas by state" }
        ul.states {
            @for (s, n) in &o.states {
                li { a href=(format!("/dashboard/sagas?state={s}")) { (s) } ": " (n) }
            }
        }
        h2 { "Stuck sagas" }
        (saga_table(&stuck.into_iter().map(api::SagaView::from).collect::<Vec<_>>()))
        h2 { "Latest actions" }
        (audit_table(&recent))
        p { a href="/dashboard/audit" { "Whole audit log" } }
    };
    Ok(page(layout("Overview", Some(&session), body)))
}

/// A count the Scheduler may not have told yet.
fn optional(n: Option<i64>) -> String {
    n.map_or("–".to_owned(), |n| n.to_string())
}

/// One partition of the overview; `app.js` renders the same row on refresh.
fn partition_row(p: &actions::PartitionView) -> Markup {
    html! {
        tr id=(format!("partition-{}", p.partition)) class=(if p.stalled { "stalled" } else { "ok" }) data-stalled=(p.stalled) {
            td { (p.partition) }
            td { @if p.owner.is_empty() { "–" } @else { (p.owner) } }
            td { (if p.owner_alive { "yes" } else { "no" }) }
            td { (p.lease_expires_at.map_or("–".to_owned(), |t| t.format("%H:%M:%S UTC").to_string())) }
            td { (p.checkpoint) "." (p.checkpoint_index) }
            td { @if let Some(l) = p.lag_seconds { (format!("{l:.2}")) } @else { "–" } }
            td.status { @if p.stalled { "STALLED: " (p.stall_reasons.join("; ")) } @else { "ok" } }
        }
    }
}

async fn overview_json(_: Session, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let overview = actions::overview(&state).await?;
    let downstream = downstream_line(&state.scheduler.breakers(&state.downstream).await);
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(OverviewPage {
            overview,
            downstream,
        }))
}

fn saga_table(rows: &[api::SagaView]) -> Markup {
    html! {
        @if rows.is_empty() { p.muted { "None." } } @else {
            table.sagas {
                thead { tr { th { "delivery" } th { "account" } th { "state" } th { "detail" } th { "package" } th { "drone" } th { "updated" } } }
                tbody {
                    @for s in rows {
                        tr data-delivery-id=(s.delivery_id) {
                            td { a href=(format!("/dashboard/sagas/{}", s.delivery_id)) { code { (s.delivery_id) } } }
                            td { (s.owner_id) }
                            td { span class=(format!("state state-{}", s.state)) { (s.state) } @if s.stuck { " " span.state.state-stuck { "stuck" } } }
                            td { (s.detail.clone().unwrap_or_default()) }
                            td { (s.package_id.clone().unwrap_or_default()) }
                            td { (s.drone_id.clone().unwrap_or_default()) }
                            td { (s.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                }
            }
        }
    }
}

fn audit_table(rows: &[crate::entities::audit::Model]) -> Markup {
    html! {
        @if rows.is_empty() { p.muted { "No actions yet." } } @else {
            table #audit {
                thead { tr { th { "when" } th { "who" } th { "role" } th { "what" } th { "target" } th { "why" } th { "outcome" } } }
                tbody {
                    @for a in rows {
                        tr {
                            td { (a.at.format("%Y-%m-%d %H:%M:%S")) } td { (a.actor) } td { (a.role) }
                            td { (a.action) } td { code { (a.target) } } td { (a.reason) } td { (a.outcome) }
                        }
                    }
                }
            }
        }
    }
}

async fn sagas_page(
    session: Session,
    state: web::Data<AppState>,
    q: web::Query<SagaQuery>,
) -> ApiResult<HttpResponse> {
    let search = api::search_of(&q)?;
    let rows: Vec<api::SagaView> = readmodel::search(&state.db, &search)
        .await?
        .into_iter()
        .map(api::SagaView::from)
        .collect();
    let selected = search.state.clone().unwrap_or_default();
    let body = html! {
        form #search.row method="get" action="/dashboard/sagas" {
            input #q name="q" type="search" placeholder="delivery, account, package or drone id" value=(search.q.clone().unwrap_or_default());
            select #state name="state" {
                option value="" selected[selected.is_empty()] { "any state" }
                @for s in contracts::RequestState::ALL {
                    option value=(s.as_str()) selected[selected == s.as_str()] { (s.as_str()) }
                }
            }
            label.check { input type="checkbox" name="stuck" value="true" checked[search.stuck]; " stuck only" }
            button #search-button type="submit" { "Search" }
        }
        p.muted { (rows.len()) " saga(s), most recently changed first." }
        (saga_table(&rows))
    };
    Ok(page(layout("Sagas", Some(&session), body)))
}

fn action_form(session: &Session, id: &str, action: &str, label: &str, target: &str) -> Markup {
    html! {
        form.action id=(format!("{action}-form")) method="post" action=(target) {
            input type="hidden" name="csrf" value=(session.csrf);
            label {
                "Reason (required, at most " (actions::REASON_MAX_CHARS) " characters)"
                textarea name="reason" id=(format!("{action}-reason")) required maxlength=(actions::REASON_MAX_CHARS) {}
            }
            button type="submit" id=(format!("{action}-button")) data-delivery-id=(id) { (label) }
        }
    }
}

async fn saga_page(
    session: Session,
    state: web::Data<AppState>,
    id: web::Path<String>,
    flash_q: web::Query<Flash>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?.to_owned();
    let detail = api::detail(&state, &id).await?;
    let workflow = state.scheduler.workflow(&id).await;
    let parked: Vec<api::ParkedView> = crate::parked::waiting_of(&state.db, &id)
        .await?
        .into_iter()
        .map(api::ParkedView::from)
        .collect();
    let saga_state = workflow
        .as_ref()
        .map(|w| w.state.as_str().to_owned())
        .ok()
        .or_else(|| detail.saga.as_ref().map(|s| s.state.clone()))
        .unwrap_or_else(|| "unknown".into());
    let client_state = detail.saga.as_ref().map(|s| s.state.clone());
    let trace_id = workflow
        .as_ref()
        .ok()
        .and_then(|w| w.trace_id.clone())
        .unwrap_or_default();
    // Without the Scheduler's answer, the read model's state (the client's spelling) decides.
    let known = SagaState::parse(&saga_state);
    let can_retry = known == Some(SagaState::Failed);
    let can_compensate = known.is_some_and(|s| Outcome::Compensating.allowed_from(s));
    let body = html! {
        (flash(&flash_q))
        dl.facts {
            dt { "delivery" } dd { code #delivery-id { (id) } }
            dt { "saga state" } dd { span #saga-state class=(format!("state state-{saga_state}")) { (saga_state) } }
            dt { "client sees" } dd #client-state { (client_state.unwrap_or_else(|| "–".into())) }
            @if let Some(s) = &detail.saga {
                dt { "account" } dd { (s.owner_id) }
                dt { "package" } dd { (s.package_id.clone().unwrap_or_default()) }
                dt { "drone" } dd { (s.drone_id.clone().unwrap_or_default()) }
                dt { "detail" } dd { (s.detail.clone().unwrap_or_default()) }
                @if s.stuck { dt { "stuck" } dd { span.state.state-stuck { "no progress for too long" } } }
            }
            dt { "trace id" } dd #trace-id { @if trace_id.is_empty() { span.muted { "–" } } @else { code { (trace_id) } } }
        }
        @match &workflow {
            Ok(w) => {
                @if let Some(e) = &w.error { p.flash.err { (e) } }
                h2 { "Timeline" }
                p.muted { "created " (w.created_at.format("%Y-%m-%d %H:%M:%S%.3f")) " · updated " (w.updated_at.format("%Y-%m-%d %H:%M:%S%.3f")) " · version " (w.version) " · partition " (w.partition) }
                ol #timeline.timeline {
                    @for step in &w.steps {
                        li class=(format!("step step-{}", step.status)) data-step=(step.name) {
                            strong { (step.name) } " " span class=(format!("state state-{}", step.status)) { (step.status) }
                            @if let Some(note) = step_note(step) { p.step-note { (note) } }
                            @if !step.attempts.is_empty() {
                                table.attempts {
                                    thead { tr { th { "#" } th { "outcome" } th { "started" } th { "duration" } th { "error" } } }
                                    tbody {
                                        @for a in &step.attempts {
                                            tr {
                                                td { (a.attempt) } td { (a.outcome) }
                                                td { (a.started_at.format("%H:%M:%S%.3f")) }
                                                td { (a.duration_ms) " ms" }
                                                td { (a.error.clone().unwrap_or_default()) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => { p.flash.err { "Scheduler status unavailable: " (e) } }
        }
        h2 { "Compensations" }
        @if detail.compensations.is_empty() { p.muted { "None requested." } } @else {
            table #compensations {
                thead { tr { th { "saga version" } th { "asked by" } th { "steps" } th { "status" } th { "deliveries" } th { "error" } th { "updated" } } }
                tbody {
                    @for c in &detail.compensations {
                        tr {
                            td { (c.saga_version) } td { (c.requested_by) } td { (c.steps.join(", ")) }
                            td { span class=(format!("state state-{}", c.status)) { (c.status) } }
                            td { (c.deliveries) } td { (c.error.clone().unwrap_or_default()) }
                            td { (c.updated_at.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                }
            }
        }
        @if !parked.is_empty() {
            h2 { "Parked — needs a person" }
            (parked_table(&session, &parked))
        }
        @if session.is_operator() {
            section #actions {
                h2 { "Actions" }
                @if can_retry { (action_form(&session, &id, "retry", "Retry from the failed step", &format!("/dashboard/sagas/{id}/retry"))) }
                @if can_compensate { (action_form(&session, &id, "compensate", "Compensate now", &format!("/dashboard/sagas/{id}/compensate"))) }
                @if !can_retry && !can_compensate { p.muted { "Nothing to do for a saga that is " (saga_state) "." } }
            }
        }
    };
    Ok(page(layout(&format!("Saga {id}"), Some(&session), body)))
}

/// What a step's output says that on-call staff look for: the carrier leg ArrangeThirdParty
/// booked (or why none was needed).
fn step_note(step: &contracts::StepStatus) -> Option<String> {
    let out = step.output.as_ref()?;
    if step.name != contracts::BookingStep::ArrangeThirdParty.as_str() {
        return None;
    }
    let reason = out["reason"].as_str().unwrap_or_default();
    match serde_json::from_value::<contracts::CarrierLeg>(out["leg"].clone()) {
        Ok(leg) if out["required"] == true => Some(format!(
            "carrier leg {}: {} ({}) from {} to {}{}, hand-over at {}; {reason}",
            out["legId"].as_str().unwrap_or_default(),
            leg.carrier_name,
            leg.carrier_id,
            leg.from_location,
            leg.to_location,
            if leg.whole_route {
                " (the whole route, no drone)"
            } else {
                ""
            },
            leg.handover_time.format("%Y-%m-%d %H:%M:%S UTC"),
        )),
        _ => Some(format!("no carrier leg: {reason}")),
    }
}

fn parked_table(session: &Session, rows: &[api::ParkedView]) -> Markup {
    html! {
        @if rows.is_empty() { p.muted { "Nothing parked." } } @else {
            table #parked {
                thead { tr { th { "delivery" } th { "reason" } th { "deliveries" } th { "parked at" } @if session.is_operator() { th { "redrive" } } } }
                tbody {
                    @for p in rows {
                        tr {
                            td { @if let Some(d) = &p.delivery_id { a href=(format!("/dashboard/sagas/{d}")) { code { (d) } } } @else { "undecodable" } }
                            td {
                                (p.reason)
                                // The message as it was published, for the person who must fix it.
                                details.payload { summary { "message" } pre { code { (p.payload) } } }
                            }
                            td { (p.delivery_count) }
                            td { (p.parked_at.format("%Y-%m-%d %H:%M:%S")) }
                            @if session.is_operator() {
                                td {
                                    form.action.inline method="post" action=(format!("/dashboard/parked/{}/redrive", p.message_id)) {
                                        input type="hidden" name="csrf" value=(session.csrf);
                                        input type="text" name="reason" placeholder="reason (required)" required maxlength=(actions::REASON_MAX_CHARS);
                                        button type="submit" { "Redrive" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn parked_page(
    session: Session,
    state: web::Data<AppState>,
    flash_q: web::Query<Flash>,
) -> ApiResult<HttpResponse> {
    let rows: Vec<api::ParkedView> = crate::parked::waiting(&state.db, 500)
        .await?
        .into_iter()
        .map(api::ParkedView::from)
        .collect();
    let body = html! {
        (flash(&flash_q))
        p.muted { "Compensation requests that failed on every delivery. Fix the cause, then redrive." }
        (parked_table(&session, &rows))
    };
    Ok(page(layout(
        "Parked — needs a person",
        Some(&session),
        body,
    )))
}

async fn audit_page(session: Session, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let rows = audit::recent(&state.db, 500).await?;
    Ok(page(layout(
        "Audit log",
        Some(&session),
        audit_table(&rows),
    )))
}

#[derive(Debug, Deserialize)]
struct ActionForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

impl ActionForm {
    /// The reason as the Scheduler will count it: browsers send a textarea's line breaks as
    /// CRLF but count them as one character against `maxlength`, so they are counted as one here.
    fn reason(&self) -> Result<String, ApiError> {
        let r = self.reason.replace("\r\n", "\n");
        let r = r.trim();
        if r.is_empty() {
            Err(ApiError::field("reason", "is required"))
        } else if r.chars().count() > actions::REASON_MAX_CHARS {
            Err(ApiError::field(
                "reason",
                format!("must be at most {} characters", actions::REASON_MAX_CHARS),
            ))
        } else {
            Ok(r.to_owned())
        }
    }
}

/// Only operators, with this session's CSRF token, and a reason. A refusal is audited too (best
/// effort: a refused action changes nothing).
async fn authorise(
    state: &AppState,
    session: &Session,
    form: &ActionForm,
    action: &str,
    target: &str,
) -> Result<String, ApiError> {
    let allowed = session
        .require_operator()
        .and_then(|()| session.check_csrf(&form.csrf));
    if let Err(refusal) = allowed {
        let reason: String = form
            .reason
            .trim()
            .chars()
            .take(actions::REASON_MAX_CHARS)
            .collect();
        audit_best_effort(
            &state.db,
            audit::Entry {
                actor: &session.user,
                role: session.role.as_str(),
                action,
                target,
                reason: &reason,
                outcome: &format!("refused: {refusal}"),
            },
        )
        .await;
        return Err(refusal);
    }
    form.reason()
}

fn back(to: &str, done: &actions::Done) -> HttpResponse {
    let key = if done.ok { "done" } else { "error" };
    see_other(&format!("{to}?{key}={}", auth::urlencode(&done.message)))
}

async fn retry(
    session: Session,
    state: web::Data<AppState>,
    id: web::Path<String>,
    form: web::Form<ActionForm>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let reason = authorise(&state, &session, &form, "retry", id).await?;
    let actor = Actor {
        name: &session.user,
        role: session.role.as_str(),
    };
    let done = actions::retry(&state, &actor, id, &reason).await?;
    Ok(back(&format!("/dashboard/sagas/{id}"), &done))
}

async fn compensate(
    session: Session,
    state: web::Data<AppState>,
    id: web::Path<String>,
    form: web::Form<ActionForm>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let reason = authorise(&state, &session, &form, "compensate", id).await?;
    let actor = Actor {
        name: &session.user,
        role: session.role.as_str(),
    };
    let done = actions::compensate_now(&state, &actor, id, &reason).await?;
    Ok(back(&format!("/dashboard/sagas/{id}"), &done))
}

async fn redrive(
    session: Session,
    state: web::Data<AppState>,
    id: web::Path<String>,
    form: web::Form<ActionForm>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("messageId", &id)?;
    let reason = authorise(&state, &session, &form, "redrive", id).await?;
    let actor = Actor {
        name: &session.user,
        role: session.role.as_str(),
    };
    let done = actions::redrive(&state, &actor, id, &reason).await?;
    Ok(back("/dashboard/parked", &done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(reason: &str) -> ActionForm {
        ActionForm {
            csrf: String::new(),
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn reasons_are_counted_as_the_form_counts_them() {
        let n = actions::REASON_MAX_CHARS;
        // A textarea's line break counts once against maxlength but is sent as CRLF.
        let at_limit = format!("{}\r\n{}", "🛸".repeat(n - 2), "z");
        assert_eq!(
            form(&at_limit).reason().map(|r| r.chars().count()).ok(),
            Some(n)
        );
        let over = "a".repeat(n + 1);
        assert!(form(&over).reason().is_err());
        assert!(form("  \r\n ").reason().is_err());
        assert_eq!(form("  why  ").reason().ok().as_deref(), Some("why"));
    }

    fn breaker(
        service: &str,
        state: BreakerState,
        rejected: u64,
        next_probe_at: Option<DateTime<Utc>>,
    ) -> contracts::BreakerStatus {
        contracts::BreakerStatus {
            service: service.to_owned(),
            state,
            calls_in_window: 0,
            failures_in_window: 0,
            reason: None,
            opened_at: None,
            next_probe_at,
            rejected_total: rejected,
            in_flight: 0,
            max_concurrent_calls: 64,
        }
    }

    #[test]
    fn the_downstream_line_shows_the_worst_breaker_of_every_caller() {
        use chrono::TimeZone;
        let at = |s: u32| Utc.with_ymd_and_hms(2026, 12, 5, 12, 0, s).single();
        let reports = vec![
            BreakerReport {
                source: "scheduler-0".into(),
                breakers: Ok(vec![
                    breaker("account", BreakerState::Closed, 0, None),
                    breaker("package", BreakerState::Open, 300, at(9)),
                    breaker("drone", BreakerState::Closed, 2, None),
                ]),
            },
            BreakerReport {
                source: "scheduler-1".into(),
                breakers: Err("scheduler GET /api/breakers: timed out".into()),
            },
            BreakerReport {
                source: "supervisor".into(),
                breakers: Ok(vec![
                    breaker("account", BreakerState::Closed, 0, None),
                    breaker("package", BreakerState::Open, 40, at(5)),
                    breaker("drone", BreakerState::HalfOpen, 1, None),
                ]),
            },
        ];
        let line = downstream_line(&reports);
        let texts: Vec<String> = line.services.iter().map(downstream_text).collect();
        assert_eq!(
            texts,
            [
                "account closed",
                "package OPEN (next probe 12:00:05 UTC, 340 rejected; on scheduler-0, supervisor)",
                "drone half-open (3 rejected; on supervisor)",
            ]
        );
        assert_eq!(
            line.errors,
            ["scheduler-1: scheduler GET /api/breakers: timed out"]
        );
        let html = downstream_markup(&line).into_string();
        assert!(html.contains("Downstream services"), "{html}");
        assert!(
            html.contains("data-service=\"package\" data-state=\"open\""),
            "{html}"
        );
        assert!(html.contains("not told by scheduler-1"), "{html}");
        let json = serde_json::to_value(&line).unwrap_or_default();
        assert_eq!(json["services"][1]["state"], "open");
        assert_eq!(json["services"][1]["notClosedOn"][1], "supervisor");
    }

    #[test]
    fn waits_read_as_a_person_would_say_them() {
        assert_eq!(wait_text(1), "1 second");
        assert_eq!(wait_text(45), "45 seconds");
        assert_eq!(wait_text(900), "15 minutes");
        assert_eq!(wait_text(121), "3 minutes");
    }

    #[test]
    fn the_timeline_shows_the_carrier_leg_or_why_there_is_none() {
        let step = |output: serde_json::Value| contracts::StepStatus {
            name: "ArrangeThirdParty".into(),
            status: "succeeded".into(),
            output: Some(output),
            attempts: Vec::new(),
        };
        let leg = serde_json::json!({
            "required": true,
            "legId": "d1",
            "reason": "the drop-off is 40.3 km from the pickup",
            "leg": {
                "carrierId": "cascade", "carrierName": "Cascade Freight",
                "fromLocation": "0,47.6,-122.3", "toLocation": "0,47.3,-122.4",
                "wholeRoute": false, "handoverTime": "2030-01-01T10:40:00Z"
            }
        });
        assert_eq!(
            step_note(&step(leg)).as_deref(),
            Some(
                "carrier leg d1: Cascade Freight (cascade) from 0,47.6,-122.3 to 0,47.3,-122.4, \
                 hand-over at 2030-01-01 10:40:00 UTC; the drop-off is 40.3 km from the pickup"
            )
        );
        let none = serde_json::json!({"required": false, "reason": "within range"});
        assert_eq!(
            step_note(&step(none)).as_deref(),
            Some("no carrier leg: within range")
        );
        let mut other = step(serde_json::json!({"droneId": "drone-001"}));
        other.name = "ReserveDrone".into();
        assert_eq!(step_note(&other), None);
    }
}
