use host::bundle::Select;
use host::{Arguments, Bundle, Engine, Notebook, Outcome, Policy, Prepared, Runtime, Sandbox};
use serde_json::json;

use crate::common::Fixture;

#[test]
fn one_engine_serves_concurrent_calls_each_in_its_own_instance() {
    let fx =
        Fixture::code(&["STATE = []\ndef add(x):\n    STATE.append(x)\n    return sum(STATE)"]);
    let engine = Engine::new(None).unwrap();
    let sandbox = Sandbox::new(&engine, &Runtime::locate(None).unwrap()).unwrap();
    let notebook = Notebook::read(&fx.notebook).unwrap();
    let bundle = Bundle::from_notebook(&sandbox, &notebook, Select::Only(&["add"]), None).unwrap();
    let prepared = Prepared::new(&sandbox, bundle).unwrap();
    assert!(prepared.image.is_some());
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..=4)
            .map(|i| {
                let (sandbox, prepared) = (&sandbox, &prepared);
                s.spawn(move || {
                    let args = Arguments::from_flags(Some(&format!("[{i}]")), None).unwrap();
                    (0..5)
                        .map(|_| {
                            host::call::call(sandbox, &Policy::default(), prepared, "add", &args)
                                .unwrap()
                                .outcome
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            for outcome in h.join().unwrap() {
                assert_eq!(
                    outcome,
                    Outcome::Returned(json!(i + 1)),
                    "no call sees another's state"
                );
            }
        }
    });
}
