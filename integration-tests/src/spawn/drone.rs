use crate::{test_auth, test_http, Backend, TestApp, TestDb};

pub async fn spawn_drone(backend: Backend) -> TestApp {
    telemetry::init_for_tests();
    let db = TestDb::new(backend, "drone").await;
    let settings = drone::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        ..drone::Settings::default()
    };
    let app = drone::Application::build(settings)
        .await
        .expect("drone service starts");
    let port = app.port();
    TestApp::start(port, db, move |rx| async move {
        let _ = app
            .run_until(async {
                let _ = rx.await;
            })
            .await;
    })
}

/// A Drone service whose settings the test adjusts first (fleet size, window length, ...).
pub async fn spawn_drone_with(
    backend: Backend,
    adjust: impl FnOnce(&mut drone::Settings),
) -> TestApp {
    telemetry::init_for_tests();
    let db = TestDb::new(backend, "drone").await;
    let mut settings = drone::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        ..drone::Settings::default()
    };
    adjust(&mut settings);
    let app = drone::Application::build(settings)
        .await
        .expect("drone service starts");
    let port = app.port();
    TestApp::start(port, db, move |rx| async move {
        let _ = app
            .run_until(async {
                let _ = rx.await;
            })
            .await;
    })
}
