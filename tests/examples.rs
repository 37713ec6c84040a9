use serde_json::json;

use crate::common::{host, repo};

#[test]
fn churn_features_from_the_example_input() {
    let nb = repo().join("notebooks/churn.ipynb");
    let input = repo().join("notebooks/churn-input.json");
    let run = host(&[
        "run",
        nb.to_str().unwrap(),
        "process",
        "--input",
        input.to_str().unwrap(),
    ]);
    let rows = run.value();
    assert_eq!(rows.as_array().unwrap().len(), 3);
    assert_eq!(
        rows[0],
        json!({"customer": "c-001", "orders": 2, "spend": 280.49, "refunds": 0, "avg_order": 140.24,
               "recency_days": 11, "high_value": true, "log_spend": 5.6401})
    );
    assert!(run.stderr.contains("process: 5 records, 3 customers"));
}

#[test]
fn churn_scoring_reads_its_model_from_a_granted_directory() {
    let nb = repo().join("notebooks/scoring.ipynb");
    let input = repo().join("notebooks/scoring-input.json");
    let models = format!("{}:/models", repo().join("notebooks/models").display());
    let args = [
        "run",
        nb.to_str().unwrap(),
        "predict",
        "--input",
        input.to_str().unwrap(),
    ];
    let mut granted = args.to_vec();
    granted.extend(["--grant", &models]);
    let v = host(&granted).value();
    assert_eq!(v["model"], json!("churn-lr-2026-10"));
    let at_risk: Vec<&str> = v["scores"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["at_risk"] == json!(true))
        .map(|s| s["customer"].as_str().unwrap())
        .collect();
    assert_eq!(at_risk, ["c-002"]);
    // Without the grant, the model is not there.
    host(&args).fails(
        1,
        &[
            "FileNotFoundError",
            "/models/churn-model.json",
            "scoring.ipynb, cell 5, line 3, in load_model",
        ],
    );
}
