use crate::{test_auth, test_http, Backend, TestApp, TestDb};

pub async fn spawn_delivery(backend: Backend) -> TestApp {
    telemetry::init_for_tests();
    let db = TestDb::new(backend, "delivery").await;
    let settings = delivery::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
    };
    let app = delivery::Application::build(settings)
        .await
        .expect("delivery service starts");
    let port = app.port();
    TestApp::start(port, db, move |rx| async move {
        let _ = app
            .run_until(async {
                let _ = rx.await;
            })
            .await;
    })
}
