//! An unpack killed at any point (a SIGKILL or power cut, simulated by failpoints that abort
//! the process on the spot) leaves a target that says it is not usable, and a second run
//! completes it into exactly the source tree.

use integration_tests::treediff::{describe, diff};
use integration_tests::*;

#[test]
fn an_unpack_killed_anywhere_leaves_the_marker_and_a_redo_completes_it() {
    let w = scratch();
    let src = w.path().join("src");
    make_special_tree(&src);
    let (home, ex) = build_and_export(w.path(), &src, &[]);
    let expected = describe(&src);
    let unpack = |target: &std::path::Path| unpack_cmd(&home, &ex, target);
    for fp in [
        "unpack-marked",
        "unpack-entry@1",
        "unpack-entry@7",
        "unpack-entry@30",
        "unpack-before-complete",
    ] {
        let target = w.path().join(format!("t-{fp}"));
        let err = fails(unpack(&target).env("REINSTALL_FAILPOINTS", fp));
        let name = fp.split('@').next().unwrap();
        assert!(
            err.contains(&format!("failpoint {name} hit")),
            "{fp}: {err}"
        );
        assert!(
            target.join(".reinstall-incomplete").exists(),
            "{fp}: killed unpack left no marker"
        );
        ok(&mut unpack(&target));
        assert!(!target.join(".reinstall-incomplete").exists(), "{fp}");
        let d = diff(&describe(&target), &expected, 10, |_| false);
        assert!(
            d.is_empty(),
            "{fp}: redo differs from the source:\n{}",
            d.join("\n")
        );
    }
}
