use serde_json::{json, Value};

use super::*;

fn fields(v: Value) -> ConstraintFields {
    serde_json::from_value(v).expect("the fields parse")
}

fn constraint(v: Value) -> Result<Option<Constraint>> {
    fields(v).constraint()
}

fn err(v: Value) -> String {
    match constraint(v.clone()) {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("{v} gave {other:?}"),
    }
}

fn flexible() -> JsonOptions {
    JsonOptions::default()
}

#[test]
fn each_form_of_each_constraint() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let want = Some(Constraint::Json { schema: schema.clone(), options: flexible() });
    assert_eq!(constraint(json!({})).unwrap(), None);
    assert_eq!(constraint(json!({"response_format": {"type": "text"}})).unwrap(), None);
    assert_eq!(constraint(json!({"response_format": null, "guided_json": null})).unwrap(), None);
    assert_eq!(
        constraint(json!({"response_format": {"type": "json_object"}})).unwrap(),
        Some(Constraint::json_object(flexible()))
    );
    assert_eq!(
        constraint(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}))
            .unwrap(),
        want
    );
    // vLLM's alias for `schema`.
    assert_eq!(
        constraint(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "json_schema": schema}}})
        )
        .unwrap(),
        want
    );
    assert_eq!(constraint(json!({"guided_json": schema})).unwrap(), want);
    assert_eq!(constraint(json!({"guided_json": schema.to_string()})).unwrap(), want);
    assert_eq!(constraint(json!({"structured_outputs": {"json": schema}})).unwrap(), want);
    assert_eq!(constraint(json!({"guided_regex": "a+"})).unwrap(), Some(Constraint::Regex("a+".into())));
    assert_eq!(
        constraint(json!({"structured_outputs": {"regex": "a+"}})).unwrap(),
        Some(Constraint::Regex("a+".into()))
    );
    let choice = Some(Constraint::Choice(vec!["x".into(), "y".into()]));
    assert_eq!(constraint(json!({"guided_choice": ["x", "y"]})).unwrap(), choice);
    assert_eq!(constraint(json!({"structured_outputs": {"choice": ["x", "y"]}})).unwrap(), choice);
    let g = Some(Constraint::Grammar("start: \"a\"".into()));
    assert_eq!(constraint(json!({"guided_grammar": "start: \"a\""})).unwrap(), g);
    assert_eq!(constraint(json!({"structured_outputs": {"grammar": "start: \"a\""}})).unwrap(), g);
    assert_eq!(
        constraint(json!({"structured_outputs": {"json_object": true}})).unwrap(),
        Some(Constraint::json_object(flexible()))
    );
    assert_eq!(constraint(json!({"guided_json": schema, "guided_decoding_backend": "guidance"})).unwrap(), want);
}

#[test]
fn whitespace_and_property_options() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}});
    let c = constraint(json!({"structured_outputs": {
        "json": schema, "disable_any_whitespace": true, "disable_additional_properties": true,
        "whitespace_pattern": "[ ]?", "disable_fallback": true
    }}))
    .unwrap()
    .unwrap();
    let Constraint::Json { schema: s, options } = c else { panic!("{c:?}") };
    assert_eq!(
        options,
        JsonOptions {
            any_whitespace: false,
            whitespace_pattern: Some("[ ]?".into()),
            no_additional_properties: true,
            spaced: false
        }
    );
    let mut applied = s.clone();
    options.apply(&mut applied);
    assert_eq!(applied["additionalProperties"], json!(false));
    assert_eq!(applied["properties"]["a"]["additionalProperties"], json!(false));
    assert_eq!(applied["x-guidance"], json!({"whitespace_flexible": false, "whitespace_pattern": "[ ]?"}));
    // What the schema says itself wins.
    let mut own = json!({"type": "object", "additionalProperties": true, "x-guidance": {"whitespace_flexible": true}});
    options.apply(&mut own);
    assert_eq!(own["additionalProperties"], json!(true));
    assert_eq!(own["x-guidance"]["whitespace_flexible"], json!(true));
    // Options alone in structured_outputs apply to the constraint another field gives.
    let c = constraint(json!({
        "response_format": {"type": "json_object"},
        "structured_outputs": {"disable_any_whitespace": true}
    }))
    .unwrap();
    assert_eq!(c, Some(Constraint::json_object(JsonOptions { any_whitespace: false, ..JsonOptions::default() })));
    let c = constraint(json!({"guided_regex": "a", "guided_whitespace_pattern": " *"})).unwrap();
    assert_eq!(c, Some(Constraint::Regex("a".into())));
}

#[test]
fn refusals_name_the_field_and_the_reason() {
    let m = err(json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}));
    assert!(m.contains("response_format and guided_regex"), "{m}");
    let m = err(json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}));
    assert!(m.contains("regex and choice"), "{m}");
    assert!(err(json!({"guided_decoding_backend": "xgrammar", "guided_regex": "a"})).contains("llguidance"));
    assert!(err(json!({"structural_tag": "{}"})).contains("structural_tag"));
    assert!(err(json!({"response_format": {"type": "structural_tag"}})).contains("structural_tag"));
    assert!(err(json!({"response_format": {"type": "yaml"}})).contains("\"yaml\""));
    assert!(err(json!({"response_format": "json"})).contains("response_format must be an object"));
    assert!(err(json!({"response_format": {}})).contains("needs a `type`"));
    assert!(err(json!({"response_format": {"type": "json_schema"}})).contains("json_schema"));
    assert!(err(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}))
        .contains("schema is missing"));
    assert!(err(json!({"guided_json": "{not json"})).contains("not JSON text"));
    assert!(err(json!({"guided_json": 3})).contains("must be a JSON schema"));
    assert!(err(json!({"guided_choice": []})).contains("non-empty array"));
    assert!(err(json!({"guided_choice": ["a", 1]})).contains("array of strings"));
    assert!(err(json!({"guided_regex": 5})).contains("guided_regex must be a regular expression"));
    assert!(err(json!({"guided_grammar": "  "})).contains("empty"));
    assert!(err(json!({"structured_outputs": {"jsn": {}}})).contains("structured_outputs.jsn"));
    assert!(err(json!({"structured_outputs": {"disable_any_whitespace": true}})).contains("no constraint"));
    assert!(err(json!({"structured_outputs": {"json_object": "yes"}})).contains("true or false"));
    assert!(err(json!({"structured_outputs": [1]})).contains("must be an object"));
}
