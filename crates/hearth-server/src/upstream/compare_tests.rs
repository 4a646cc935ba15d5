//! Unit tests of `compare.rs`.

use super::*;

fn route(s: &str) -> Route {
    Route::parse(s).unwrap()
}

fn ok(latency: f64) -> Observation {
    Observation {
        outcome: Outcome::Succeeded,
        latency: Some(latency),
        first_output: Some(latency / 10.0),
        tokens_per_second: Some(100.0),
    }
}

#[test]
fn counts_add_up_and_only_routed_models_are_kept() {
    let routes = [
        ("a/shadow".to_string(), route("shadow:up:50")),
        ("a/canary".to_string(), route("canary:up:10")),
        ("a/plain".to_string(), route("upstream:up")),
    ];
    let c = Comparison::new(routes.iter().map(|(m, r)| (m, r)));
    assert!(c.is_compared("a/shadow") && c.is_compared("a/canary"));
    assert!(!c.is_compared("a/plain") && !c.is_compared("x/y"));
    c.observe("x/y", Side::Local, &ok(1.0));
    for i in 0..10 {
        c.observe("a/shadow", Side::Local, &ok(f64::from(i)));
    }
    c.observe(
        "a/shadow",
        Side::Local,
        &Observation::refused(FailKind::Validation),
    );
    for _ in 0..4 {
        c.eligible("a/shadow");
    }
    c.skipped("a/shadow", Skip::Rate);
    for _ in 0..3 {
        c.copy_started("a/shadow");
    }
    c.copy_refused("a/shadow", Skip::Throttled);
    let t = |s: &str| vec![s.to_string()];
    c.pair(
        "a/shadow",
        Side::Upstream,
        &ok(2.0),
        Pair {
            id: "p1".into(),
            upstream_id: Some("u1".into()),
            local: Status::Succeeded,
            upstream: Status::Succeeded,
            copy_started_at: None,
            agreement: Some(stats::agreement(&t("kitten"), &t("sitting"))),
        },
    );
    let s = c.snapshot();
    let m = &s["models"][1];
    assert_eq!(m["model"], "a/shadow");
    let local = &m["sides"]["local"];
    assert_eq!(local["count"], 11);
    assert_eq!(local["succeeded"], 10);
    assert_eq!(local["failed"]["validation"], 1);
    assert!((local["failure_rate"].as_f64().unwrap() - 1.0 / 11.0).abs() < 1e-12);
    assert_eq!(local["latency_seconds"]["p50"], 4.0);
    assert_eq!(local["latency_seconds"]["p99"], 9.0);
    let sh = &m["shadow"];
    assert_eq!(sh["eligible"], 4);
    assert_eq!(sh["copies"], 2);
    assert_eq!(sh["in_flight"], 1);
    assert_eq!(sh["skipped"]["rate"], 1);
    assert_eq!(sh["skipped"]["throttled"], 1);
    // eligible = copies + skipped; copies = ended + in flight.
    assert_eq!(
        sh["eligible"].as_u64().unwrap(),
        sh["copies"].as_u64().unwrap() + sh["skipped_total"].as_u64().unwrap()
    );
    assert_eq!(m["sides"]["upstream"]["count"], 1);
    let ag = &sh["agreement"];
    assert_eq!(ag["compared"], 1);
    assert_eq!(ag["exact"], 0);
    assert_eq!(ag["text"]["above_0_9"], 0);
    assert!((ag["text"]["similarity_mean"].as_f64().unwrap() - 4.0 / 7.0).abs() < 1e-12);
    assert_eq!(sh["recent_pairs"][0]["upstream_id"], "u1");
    assert!(
        s["models"][0].get("shadow").is_none(),
        "canary: no shadow block"
    );

    let mut prom = String::new();
    c.render_metrics(&mut prom);
    assert!(prom.contains("hearth_compare_predictions_total{model=\"a/shadow\",side=\"local\",outcome=\"failed_validation\"} 1"), "{prom}");
    assert!(
        prom.contains(
            "hearth_compare_latency_seconds{model=\"a/shadow\",side=\"local\",quantile=\"0.5\"} 4"
        ),
        "{prom}"
    );
    assert!(
        prom.contains(
            "hearth_compare_shadow_copies_total{model=\"a/shadow\",result=\"skipped_rate\"} 1"
        ),
        "{prom}"
    );
    assert!(!prom.contains("a/plain"));
}

#[test]
fn a_shadow_local_route_counts_its_copies_on_the_local_side() {
    let routes = [("a/rev".to_string(), route("shadow-local:up:100"))];
    let c = Comparison::new(routes.iter().map(|(m, r)| (m, r)));
    c.observe("a/rev", Side::Upstream, &ok(1.0));
    c.eligible("a/rev");
    c.eligible("a/rev");
    c.copy_started("a/rev");
    c.copy_started("a/rev");
    c.copy_refused("a/rev", Skip::LocalEngine);
    c.pair(
        "a/rev",
        Side::Local,
        &ok(3.0),
        Pair {
            id: "p1".into(),
            upstream_id: Some("u1".into()),
            local: Status::Succeeded,
            upstream: Status::Succeeded,
            copy_started_at: Some("2026-01-01T00:00:01.000000Z".into()),
            agreement: None,
        },
    );
    let m = &c.snapshot()["models"][0];
    assert_eq!(m["route"], "shadow-local:up:100");
    assert_eq!(m["sides"]["upstream"]["role"], "primary");
    assert_eq!(m["sides"]["local"]["role"], "shadow");
    assert_eq!(m["sides"]["upstream"]["count"], 1);
    assert_eq!(m["sides"]["local"]["count"], 1);
    let sh = &m["shadow"];
    assert_eq!(sh["copies"], 1);
    assert_eq!(sh["skipped"]["local_engine"], 1);
    assert_eq!(sh["in_flight"], 0);
    assert_eq!(
        sh["recent_pairs"][0]["copy_started_at"],
        "2026-01-01T00:00:01.000000Z"
    );
}

#[test]
fn records_are_read_on_their_own_side_clock() {
    let mut r: Record = serde_json::from_value(json!({
        "prediction": {
            "id": "x", "model": "a/b", "version": "", "input": {}, "logs": "",
            "output": ["hi"], "error": null, "status": "succeeded",
            "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z",
            "completed_at": "2026-01-01T00:00:03.5Z", "data_removed": false,
            "source": "api", "metrics": {"output_token_count": 10, "predict_time": 2.0}
        },
        "base_url": "", "stream_token": "", "webhook": null,
        "webhook_events_filter": [], "created_unix": 0
    }))
    .unwrap();
    let o = Observation::from_record(&r, Side::Upstream, 9.0, Some(1.25));
    assert_eq!(o.outcome, Outcome::Succeeded);
    assert_eq!(o.latency, Some(3.5));
    assert_eq!(o.first_output, Some(1.25));
    assert_eq!(o.tokens_per_second, Some(5.0));
    r.prediction.status = Status::Failed;
    r.prediction.error = Some("upstream up answered the create with 503 (x)".into());
    assert_eq!(
        Observation::from_record(&r, Side::Upstream, 1.0, None).outcome,
        Outcome::Failed(FailKind::Upstream5xx)
    );
    r.prediction.error = Some("CUDA out of memory".into());
    assert_eq!(
        Observation::from_record(&r, Side::Upstream, 1.0, None).outcome,
        Outcome::Failed(FailKind::Engine)
    );
    r.prediction.status = Status::Canceled;
    r.prediction.logs = "Deadline passed (Cancel-After): canceled.\n".into();
    assert_eq!(
        Observation::from_record(&r, Side::Local, 1.0, None).outcome,
        Outcome::Failed(FailKind::Timeout)
    );
}
