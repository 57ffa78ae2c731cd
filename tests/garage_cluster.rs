//! The object store as the distributed engine: a 3-node Garage cluster on
//! loopback, replication factor 3. Back up, stop one node, restore and
//! back up again, bit-exact; the repository checks clean throughout.

mod common;

use common::cloud::*;
use common::objstores::Garage;
use common::*;

#[test]
fn a_three_node_garage_cluster_keeps_working_with_one_node_down() {
    if !need() {
        return;
    }
    let Some(mut nodes) = Garage::cluster3() else {
        return;
    };
    let g = &nodes[0];
    let d = Blockd::start();
    let args = g.credentials_args("s3", &g.secret, None);
    d.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "48M");
    let img = image(tmp.path(), "v.img", 48 * MB, 32 * MB, 7);
    load(&d, "v", &img);
    let first = backup(&d, &["v", "--cred-id", "s3"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    // One node of three goes away: quorum (2 of 3) still reads and writes.
    nodes[2].stop();
    let r = restore(&d, &first, "r1", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "r1");
    scatter(&d, "v", &img, 32, 8);
    let t = backup(&d, &["v", "--cred-id", "s3"]);
    assert_eq!(t["full"], false, "{t}");
    let second = t["snapshot"].as_str().unwrap().to_string();
    let r = restore(&d, &second, "r2", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "r2");
    let c = json(&d.ok(&["-j", "repo", "check", "--cred-id", "s3", "--read-data"]));
    assert!(c["problems"].as_array().unwrap().is_empty(), "{c}");

    // Back again: it catches up; everything still reads.
    let (up, down) = nodes.split_at_mut(2);
    down[0].rejoin(&up[0]);
    let c = json(&d.ok(&["-j", "repo", "check", "--cred-id", "s3", "--read-data"]));
    assert!(c["problems"].as_array().unwrap().is_empty(), "{c}");
    assert_eq!(c["snapshots"], 2, "{c}");
}
