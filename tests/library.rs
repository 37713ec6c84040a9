use host::bundle::Select;
use host::{
    Arguments, Bundle, Engine, Notebook, Outcome, Policy, Prepared, Request, Runtime, Sandbox,
};
use serde_json::json;

use crate::common::{Fixture, cache_dir};

/// Calls `function` with positional `args` (JSON) under `policy`: its outcome.
fn call(
    sandbox: &Sandbox,
    prepared: &Prepared,
    function: &str,
    args: &str,
    policy: &Policy,
) -> Outcome {
    let arguments = Arguments {
        args: serde_json::from_str(args).unwrap(),
        ..Default::default()
    };
    let request = Request {
        function,
        arguments: &arguments,
        policy,
        record: false,
    };
    host::call::call(sandbox, prepared, &request)
        .unwrap()
        .outcome
}

#[test]
fn one_engine_serves_concurrent_calls_each_in_its_own_instance() {
    let fx =
        Fixture::code(&["STATE = []\ndef add(x):\n    STATE.append(x)\n    return sum(STATE)"]);
    let engine = Engine::new(Some(cache_dir())).unwrap();
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
                    (0..5)
                        .map(|_| {
                            call(
                                sandbox,
                                prepared,
                                "add",
                                &format!("[{i}]"),
                                &Policy::default(),
                            )
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

#[test]
fn a_call_leaves_nothing_behind_for_the_next_one() {
    // Calls of one bundle in one process reuse memories (see host's `memory` module): each
    // must start from the image all the same, whatever the call before did to its memory.
    let fx = Fixture::code(&[
        "import numpy\n\nKEEP = []\nSEEN = {'n': 0}\n\ndef grow(mb):\n    \
         before = (len(KEEP), SEEN['n'])\n    \
         KEEP.append(bytearray(b'x' * (mb << 20)))\n    \
         SEEN['n'] += 1\n    \
         return [before[0], before[1], sum(len(b) for b in KEEP) >> 20]\n\n\
         def fail():\n    KEEP.append(1)\n    raise ValueError('after a write')\n\n\
         def hog():\n    KEEP.append(bytearray(1 << 30))\n\n\
         def zeroed(mb):\n    \
         # numpy.empty is malloc'd, not cleared: its tail lies in memory grown for this call.\n    \
         tail = numpy.empty(mb << 20, dtype=numpy.uint8)[-(100 << 20):]\n    \
         return not tail.any()\n",
    ]);
    let engine = Engine::new(Some(cache_dir())).unwrap();
    let sandbox = Sandbox::new(&engine, &Runtime::locate(None).unwrap()).unwrap();
    let notebook = Notebook::read(&fx.notebook).unwrap();
    let bundle = Bundle::from_notebook(&sandbox, &notebook, Select::All, None).unwrap();
    let prepared = Prepared::new(&sandbox, bundle).unwrap();
    let call = |function: &str, args: &str, policy: &Policy| {
        call(&sandbox, &prepared, function, args, policy)
    };
    let small = Policy {
        limits: host::Limits {
            memory: 512 << 20,
            ..Default::default()
        },
        ..Default::default()
    };
    for mb in [64, 1, 200, 3] {
        assert_eq!(
            call("grow", &format!("[{mb}]"), &Policy::default()),
            Outcome::Returned(json!([0, 0, mb]))
        );
        assert!(matches!(
            call("fail", "[]", &Policy::default()),
            Outcome::Raised(_)
        ));
        assert!(matches!(call("hog", "[]", &small), Outcome::Limit(_)));
        // Memory the call before grew and filled is zero again for this one's allocator.
        assert_eq!(
            call("zeroed", "[300]", &Policy::default()),
            Outcome::Returned(json!(true))
        );
    }
}
