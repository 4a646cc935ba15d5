use super::*;

const LIMITS: RequestLimits = RequestLimits {
    vocab_size: 512,
    max_model_len: 4096,
    kv_capacity_tokens: 2048,
};

fn err(input: Value) -> String {
    match parse_input(&input, &default_inputs(), Some(&LIMITS)) {
        Err(ApiError::Problem { status, detail, .. }) => {
            assert_eq!(status.as_u16(), 422);
            detail
        }
        Ok(_) => panic!("accepted {input}"),
    }
}

#[test]
fn wrong_types_and_ranges_name_the_field() {
    assert!(err(json!({"max_tokens": "lots"})).contains("input.max_tokens: expected an integer"));
    assert!(err(json!({"max_tokens": 0})).contains("input.max_tokens"));
    assert!(err(json!({"temperature": 9}))
        .contains("input.temperature: must be less than or equal to 5"));
    assert!(err(json!({"prompt": 5})).contains("input.prompt: expected a string"));
    assert!(err(json!({"min_tokens": 10, "max_tokens": 5})).contains("min_tokens"));
    assert!(err(json!([1, 2])).contains("input: expected an object"));
}

#[test]
fn every_invalid_field_is_listed_with_its_location() {
    let e = parse_input(
        &json!({"max_new_tokens": "x", "temperature": 9, "prompt": 5, "bogus": 1}),
        &default_inputs(),
        Some(&LIMITS),
    )
    .err()
    .unwrap();
    let locs: Vec<String> = e.fields().iter().map(|f| f.loc.join(".")).collect();
    assert_eq!(
        locs,
        ["input.prompt", "input.max_new_tokens", "input.temperature"]
    );
    assert!(e.fields()[2].msg.contains("less than or equal to 5"), "{e}");
    // The runtime's own checks carry their field too.
    let e = parse_input(
        &json!({"min_tokens": 10, "max_tokens": 5}),
        &default_inputs(),
        Some(&LIMITS),
    )
    .err()
    .unwrap();
    assert_eq!(e.fields()[0].loc[0], "input");
    // Cog's rule for null: only a nullable input may be null.
    let nulls =
        null_errors(&json!({"seed": null, "prompt": null, "max_new_tokens": null, "x": null}));
    let mut locs: Vec<String> = nulls.iter().map(|f| f.loc.join(".")).collect();
    locs.sort();
    assert_eq!(locs, ["input.max_new_tokens", "input.prompt"]);
}

#[test]
fn aliases_defaults_and_comma_separated_stops() {
    let p = parse_input(
        &json!({"prompt": "hi", "max_new_tokens": 7, "stop_sequences": "<end>, <stop>"}),
        &default_inputs(),
        Some(&LIMITS),
    )
    .unwrap();
    assert_eq!(p.params.max_tokens, 7);
    assert_eq!(p.params.stop, vec!["<end>", "<stop>"]);
    assert_eq!(p.params.top_k, 50);
    assert!((p.params.temperature - 0.6).abs() < 1e-6);
    assert_eq!(p.prompt.prompt, "hi");
    assert!(p.prompt.system_prompt.is_none());
}

#[test]
fn schema_lists_inputs_in_order_with_iterator_output() {
    let s = openapi_schema(&default_inputs(), &LIMITS);
    let input = &s["components"]["schemas"]["Input"]["properties"];
    assert_eq!(input["prompt"]["x-order"], 0);
    // The model's bounds: context and cache less one prompt token, the vocabulary.
    assert_eq!(input["max_tokens"]["maximum"], 2047);
    assert_eq!(input["top_k"]["maximum"], 512);
    assert_eq!(input["seed"]["maximum"], json!(i64::MAX));
    assert_eq!(input["temperature"]["default"], 0.6);
    assert_eq!(
        s["components"]["schemas"]["Output"]["x-cog-array-type"],
        "iterator"
    );
    // `Optional[int] = None`, as Cog writes it.
    assert_eq!(input["seed"]["nullable"], true);
    assert!(input["seed"]["default"].is_null() && input["seed"].get("default").is_some());
    // Cog's paths and validation-error components.
    assert_eq!(s["paths"]["/predictions"]["post"]["x-cog-streaming"], true);
    for p in ["/", "/health-check", "/predictions/{prediction_id}/cancel"] {
        assert!(s["paths"][p].is_object(), "{p}");
    }
    let schemas = &s["components"]["schemas"];
    for k in ["version", "created_at", "started_at", "completed_at"] {
        assert!(
            schemas["PredictionResponse"]["properties"][k].is_object(),
            "{k}"
        );
    }
    assert_eq!(
        schemas["ValidationError"]["required"],
        json!(["loc", "msg", "type"])
    );
    assert!(schemas["HTTPValidationError"]["properties"]["detail"].is_object());
}

/// `top_k: 1e17` aborted the process and 2^61 killed the engine thread: both
/// reached the sampler. Refused here with the vocabulary named, as the schema says.
#[test]
fn top_k_is_bounded_by_the_vocabulary() {
    for k in [
        json!(513),
        json!(1e17),
        json!(2305843009213693952u64),
        json!(u64::MAX),
    ] {
        let e = err(json!({"top_k": k, "temperature": 1}));
        assert!(
            e.contains("input.top_k: must be less than or equal to 512"),
            "{k}: {e}"
        );
    }
    let p = parse_input(&json!({"top_k": 512}), &default_inputs(), Some(&LIMITS)).unwrap();
    assert_eq!(p.params.top_k, 512);
    let p = parse_input(&json!({"top_k": -1}), &default_inputs(), Some(&LIMITS)).unwrap();
    assert_eq!(p.params.top_k, 0);
}

/// Integers went through f64: 2^53 + 1 became 2^53, and 2^64 was accepted as a seed.
#[test]
fn integers_are_exact_and_seeds_signed_64_bit() {
    let p = parse_input(
        &json!({"seed": 9007199254740993u64}),
        &default_inputs(),
        Some(&LIMITS),
    )
    .unwrap();
    assert_eq!(p.params.seed, Some(9007199254740993));
    let p = parse_input(&json!({"seed": i64::MAX}), &default_inputs(), Some(&LIMITS)).unwrap();
    assert_eq!(p.params.seed, Some(i64::MAX as u64));
    for bad in [
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(18446744073709551616.0),
    ] {
        let e = err(json!({"seed": bad}));
        assert!(
            e.contains("input.seed: must be less than or equal to 9223372036854775807"),
            "{e}"
        );
    }
    assert!(err(json!({"seed": -1})).contains("input.seed: must be greater than or equal to 0"));
    assert!(err(json!({"max_tokens": 1.5})).contains("fractional"));
    assert!(err(json!({"max_tokens": 2048}))
        .contains("input.max_tokens: must be less than or equal to 2047"));
    assert!(err(json!({"max_tokens": -1e300}))
        .contains("input.max_tokens: must be greater than or equal to 1"));
    let p = parse_input(
        &json!({"max_tokens": 5.0}),
        &default_inputs(),
        Some(&LIMITS),
    )
    .unwrap();
    assert_eq!(p.params.max_tokens, 5);
    assert_eq!(
        exact_integer(&json!(9007199254740993u64)),
        Ok(9007199254740993)
    );
    assert_eq!(exact_integer(&json!(1e300)), Err(IntError::TooLarge));
    assert_eq!(exact_integer(&json!(-9.1e15)), Err(IntError::TooSmall));
}

#[test]
fn stop_sequences_are_bounded_in_count_and_length() {
    let many = vec!["s"; 17].join(",");
    assert!(err(json!({"stop_sequences": many})).contains("input.stop_sequences: at most 16"));
    let long = "x".repeat(257);
    assert!(err(json!({"stop_sequences": long})).contains("input.stop_sequences"));
    let ok = vec!["y".repeat(256); 16].join(",");
    let p = parse_input(
        &json!({"stop_sequences": ok}),
        &default_inputs(),
        Some(&LIMITS),
    )
    .unwrap();
    assert_eq!(p.params.stop.len(), 16);
}
