use crate::{test_auth, test_http, Backend, TestApp, TestDb};

pub async fn spawn_account(backend: Backend) -> TestApp {
    telemetry::init_for_tests();
    let db = TestDb::new(backend, "account").await;
    let settings = account::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        ..account::Settings::default()
    };
    let app = account::Application::build(settings)
        .await
        .expect("account service starts");
    let port = app.port();
    TestApp::start(port, db, move |rx| async move {
        let _ = app
            .run_until(async {
                let _ = rx.await;
            })
            .await;
    })
}
