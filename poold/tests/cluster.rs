//! Pools of real `poold` processes on loopback: elections, failover, restarts, partitions,
//! catch-up by snapshot and membership changes.

mod common;

use std::time::Duration;

use common::*;

const ELECTION: Duration = Duration::from_secs(15);

async fn failover(n: u64) {
    let _serial = SERIAL.lock().await;
    let mut cl = Cluster::start(n, &[]);
    let leader = cl.leader(ELECTION).await;
    let mut c = cl.client();
    for i in 0..10 {
        join_host(&mut c, &format!("10.0.0.{i}:7000"))
            .await
            .expect("write");
    }
    cl.kill(leader);
    let alive = cl.alive();
    let new_leader = cl.leader_among(&alive, ELECTION).await;
    assert_ne!(new_leader, leader);
    for i in 10..20 {
        join_host(&mut c, &format!("10.0.0.{i}:7000"))
            .await
            .expect("write after failover");
    }
    let hosts = list_hosts(&mut c).await;
    assert_eq!(
        hosts.len(),
        20,
        "every acknowledged write survives the failover"
    );
    // The old leader comes back as a follower and catches up.
    cl.spawn(leader);
    let st = cl.status(new_leader).await.unwrap();
    let back = cl.wait_applied(leader, st.commit_index, ELECTION).await;
    assert_ne!(back.role, "leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_fail_over_when_the_leader_dies() {
    failover(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_fail_over_when_the_leader_dies() {
    failover(5).await;
}
