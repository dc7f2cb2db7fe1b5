use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::db::TestDb;
use crate::SERVICE_TOKEN;

/// A service running inside the test process on a free port, with its own database.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    /// Sent as `Authorization: Bearer` unless a call says otherwise.
    pub token: Option<String>,
    /// The app's own database, dropped with it (None when the test keeps it, e.g. to restart).
    pub db: Option<TestDb>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A reply with its status, headers and JSON body (Null when the body is empty or not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The body as `T`, panicking with the body when it does not fit.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.body.clone())
            .unwrap_or_else(|e| panic!("unexpected body ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts this is a problem+json with `status`, and returns it.
    pub fn problem(&self, status: u16) -> contracts::Problem {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "body: {}",
            self.body
        );
        self.json()
    }

    /// The field names of a validation problem.
    pub fn bad_fields(&self) -> Vec<String> {
        self.problem(400)
            .errors
            .into_iter()
            .map(|e| e.field)
            .collect()
    }
}

impl TestApp {
    /// Wraps an application already bound to `port`; `run` is its serve-until-shutdown future.
    /// `db` goes with the app (`None` when the caller keeps it, e.g. to restart on it).
    pub fn start<F>(
        port: u16,
        db: Option<TestDb>,
        run: impl FnOnce(oneshot::Receiver<()>) -> F,
    ) -> TestApp
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(run(rx));
        TestApp {
            address: format!("http://127.0.0.1:{port}"),
            port,
            // A service that never answers fails the test with a reason instead of hanging it.
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .expect("http client"),
            token: Some(SERVICE_TOKEN.to_owned()),
            db,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// Sends a request with the app's token and an optional JSON body.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Reply {
        self.call_with(method, path, body, self.token.as_deref())
            .await
    }

    /// Sends a request with an explicit token (`None` sends no `Authorization` header).
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Reply {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        reply(req.send().await.expect("request failed")).await
    }

    /// Sends raw bytes with a content type (malformed JSON, wrong media types, huge bodies).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        let mut req = self
            .client
            .request(method, self.url(path))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        reply(req.send().await.expect("request failed")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }

    pub async fn put<B: Serialize>(&self, path: &str, body: &B) -> Reply {
        let v = serde_json::to_value(body).expect("serialisable body");
        self.call(Method::PUT, path, Some(&v)).await
    }

    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> Reply {
        let v = serde_json::to_value(body).expect("serialisable body");
        self.call(Method::POST, path, Some(&v)).await
    }

    pub async fn patch<B: Serialize>(&self, path: &str, body: &B) -> Reply {
        let v = serde_json::to_value(body).expect("serialisable body");
        self.call(Method::PATCH, path, Some(&v)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None).await
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn reply(res: reqwest::Response) -> Reply {
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}
