//! Process lifecycle: SIGTERM drains (SPEC §5, and §3's "drain → 1001").

mod common;
use common::*;

/// SIGTERM: live clients get close 1001 within `drain_ms`, the listener stops accepting,
/// and the process exits 0.
#[async_std::test]
async fn sigterm_drains_with_1001_and_exits_0() {
    let b = Backend::echo("b1").await;
    let mut cfg = one_pool_config(&[&b]);
    cfg["timeouts"] = json!({ "drain_ms": 1000 });
    let mut gw = Gateway::start(cfg).await;
    let addr = gw.addr();
    let mut c1 = connect(addr, "/", &[]).await;
    let mut c2 = connect(addr, "/", &[]).await;
    assert_eq!(c1.whoami().await, "b1");
    assert_eq!(c2.whoami().await, "b1");
    gw.signal("TERM");
    assert_eq!(c1.close_code().await, 1001);
    assert_eq!(c2.close_code().await, 1001);
    assert_eq!(gw.wait_exit(WAIT).await, Some(0));
    assert!(
        async_std::net::TcpStream::connect(addr).await.is_err(),
        "the listener still accepts after exit"
    );
}
