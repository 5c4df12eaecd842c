//! Transforms end to end: per-route mappings for two targets, a failing script, waiting for
//! missing references, remapping refs from the target's answer and the admin API, and the
//! offline preview agreeing with the delivery.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/1c/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
[broker]
url = "{amqp}"
prefix = "{prefix}"
[store]
redis_url = "{redis}"
[admin]
token = "admin-secret"
[retry]
delays = ["100ms", "200ms"]
[[node]]
name = "central"
token = "central-secret"
"#;

async fn two_targets_receive_exactly_their_shapes(backend: Backend) {
    let site = Target::start().await;
    let erp = Target::start().await;
    let config = format!(
        r#"{BASE}
[[node]]
name = "site"
token = "t"
deliver = {{ mode = "push", url = "{site}" }}
[[node]]
name = "erp"
token = "t"
deliver = {{ mode = "push", url = "{erp}", remap = true, format = "1c-xdto" }}

[[route]]
name = "to-site"
from = "central"
to = ["site"]
types = ["Catalog.*"]
[route.mapping.types."Catalog.Номенклатура"]
rename = "product"
keep = ["Ref", "Code", "Description", "Артикул", "Вес"]
fields = {{ "Description" = "name", "Артикул" = "sku" }}
set = {{ "origin" = "1c" }}

[[route]]
name = "to-erp"
from = "central"
to = ["erp"]
types = ["Document.*"]
[route.mapping.types."Document.ЗаказКлиента"]
filter = [{{ field = "Posted", eq = true }}]
refs = {{ "Контрагент" = "Catalog.Контрагенты" }}
values = {{ "Статус" = {{ "КОтгрузке" = "ready" }} }}
"#,
        site = site.url(),
        erp = erp.url()
    );
    let bridge = Bridge::start(backend, "shapes", &config).await;
    let (s, body) = admin(
        &bridge,
        reqwest::Method::PUT,
        "/api/v1/remap/erp",
        Some(json!({"pairs": [{"type": "Catalog.Контрагенты", "source": "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002", "target": "ERP-CP-42"}]})),
    )
    .await;
    assert_eq!((s, body), (200, json!({"stored": 1})));
    let (s, body) = admin(
        &bridge,
        reqwest::Method::GET,
        "/api/v1/remap/erp?type=Catalog.Контрагенты&source=e2f3a4b5-8d4b-11ee-b9d1-0242ac120002",
        None,
    )
    .await;
    assert_eq!((s, body), (200, json!({"target": "ERP-CP-42"})));

    let mut unposted = fixture("document-order.json");
    unposted["#value"]["Ref"] = json!("b5c6d7e8-0000-11ee-b9d1-0242ac120002");
    unposted["#value"]["Posted"] = json!(false);
    let items = json!([
        fixture("catalog-nomenclature.json"),
        fixture("document-order.json"),
        unposted
    ]);
    let (status, answer) = bridge.post_json("central", "central-secret", &items).await;
    assert_eq!(status, 202, "{answer}");

    eventually(WAIT, "site gets the product, erp the posted order", || {
        site.count() == 1 && erp.count() == 1
    })
    .await;
    let product = &site.received()[0].change;
    assert_eq!(product["type"], "product");
    assert_eq!(
        product["data"],
        json!({"Ref": "5f1c2a3e-8d4b-11ee-b9d1-0242ac120002", "Code": "00-00000127", "name": "Стол письменный «Эргономик» 120×60", "sku": "СТ-120-60", "Вес": 18.5, "origin": "1c"})
    );
    let order = &erp.received()[0].change;
    assert_eq!(order["type"], "Document.ЗаказКлиента");
    assert_eq!(
        order["data"]["#type"], "jcfg:DocumentObject.ЗаказКлиента",
        "erp takes 1C XDTO"
    );
    let value = &order["data"]["#value"];
    assert_eq!(
        value["Контрагент"], "ERP-CP-42",
        "the declared reference was remapped"
    );
    assert_eq!(value["Статус"], "ready");
    assert_eq!(value["Товары"].as_array().unwrap().len(), 2);

    // The unposted order was filtered for erp, and recorded so.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(erp.count(), 1);
    let (_, object) = bridge
        .admin_get("/api/v1/objects/b5c6d7e8-0000-11ee-b9d1-0242ac120002")
        .await;
    let erp_state = object["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "erp")
        .unwrap()
        .clone();
    assert_eq!(erp_state["state"], "filtered", "{object}");
    assert!(
        object["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "filtered" && e["detail"].as_str().unwrap().contains("Posted")),
        "{object}"
    );
    bridge.finish().await;
}

async fn failing_and_endless_scripts_dead_letter_while_others_flow(backend: Backend) {
    let target = Target::start().await;
    let config = format!(
        r#"{BASE}
[[node]]
name = "site"
token = "t"
deliver = {{ mode = "push", url = "{url}", batch_max = 10 }}
[[route]]
name = "scripted"
from = "central"
to = ["site"]
[route.mapping]
script = '''
if change.ref == "throws" {{ throw "no price for " + change.ref; }}
if change.ref == "loops" {{ loop {{ }} }}
change.data.scripted = true;
change
'''
"#,
        url = target.url()
    );
    let bridge = Bridge::start(backend, "script", &config).await;
    let before = rss_kb();
    let items = json!([
        {"id": "t-1", "type": "Catalog.X", "ref": "throws", "data": {}},
        {"id": "l-1", "type": "Catalog.X", "ref": "loops", "data": {}},
        {"id": "g-1", "type": "Catalog.X", "ref": "good-1", "data": {}},
    ]);
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &items)
            .await
            .0,
        202
    );
    for i in 0..20 {
        let later = json!({"id": format!("g-later-{i}"), "type": "Catalog.X", "ref": format!("later-{i}"), "data": {}});
        assert_eq!(
            bridge
                .post_json("central", "central-secret", &later)
                .await
                .0,
            202
        );
    }
    eventually(WAIT, "21 good changes delivered", || target.count() == 21).await;
    assert!(target
        .received()
        .iter()
        .all(|r| r.change["data"]["scripted"] == true));
    let start = Instant::now();
    let items = loop {
        let (_, body) = admin(&bridge, reqwest::Method::GET, "/api/v1/dlq/site", None).await;
        if body["count"] == 2 {
            break body["items"].as_array().unwrap().clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "scripts never dead-lettered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error_of = |id: &str| {
        items.iter().find(|i| i["id"] == id).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(error_of("t-1").contains("no price for throws"), "{items:?}");
    assert!(error_of("l-1").contains("script error"), "{items:?}");
    assert_eq!(items[0]["attempts"], 3);
    let grown_mb = (rss_kb().saturating_sub(before)) / 1024;
    assert!(grown_mb < 50, "memory grew {grown_mb} MB");
    bridge.finish().await;
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wait_config(url: &str, missing_refs: &str, delays: &str) -> String {
    format!(
        r#"{}
[[node]]
name = "erp"
token = "t"
deliver = {{ mode = "push", url = "{url}", missing_refs = "{missing_refs}", remap = true, concurrency = 1 }}
[[route]]
name = "to-erp"
from = "central"
to = ["erp"]
[route.mapping.types."Document.ЗаказКлиента"]
refs = {{ "Контрагент" = "Catalog.Контрагенты" }}
"#,
        BASE.replace(r#"delays = ["100ms", "200ms"]"#, delays)
    )
}

/// The order without rows, so its only reference is the counterparty.
fn order_referring_to_counterparty() -> Value {
    let mut order = fixture("document-order.json");
    let value = order["#value"].as_object_mut().unwrap();
    value.remove("Товары");
    value.remove("Основание");
    value.remove("Организация");
    value.remove("Склад");
    order
}

/// The fixture order (ref b5c6d7e8-…) is held, not delivered, and its history says it waits
/// for exactly the counterparty `counterparty`.
async fn assert_order_waits_for(bridge: &Bridge, target: &Target, counterparty: &str) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(target.count(), 0, "the order waits for its counterparty");
    let (_, object) = bridge
        .admin_get("/api/v1/objects/b5c6d7e8-8d4b-11ee-b9d1-0242ac120002")
        .await;
    let waiting: Vec<&Value> = object["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "waiting")
        .collect();
    assert!(!waiting.is_empty(), "{object}");
    assert_eq!(
        waiting[0]["detail"],
        format!("missing reference Catalog.Контрагенты {counterparty}")
    );
}

async fn with_wait_a_document_arrives_only_after_its_counterparty(backend: Backend) {
    let erp = Target::start().await;
    let config = wait_config(
        &erp.url(),
        "wait",
        r#"delays = ["300ms", "300ms", "300ms", "300ms", "300ms"]"#,
    );
    let bridge = Bridge::start(backend, "waitrefs", &config).await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &order_referring_to_counterparty(),
        )
        .await;
    assert_eq!(status, 202);
    assert_order_waits_for(&bridge, &erp, "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002").await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &fixture("catalog-counterparty.json"),
        )
        .await;
    assert_eq!(status, 202);
    eventually(WAIT, "counterparty then order", || erp.count() == 2).await;
    let kinds: Vec<String> = erp
        .received()
        .iter()
        .map(|r| r.change["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, vec!["Catalog.Контрагенты", "Document.ЗаказКлиента"]);

    // In one batch the referenced object goes first, whatever the order posted.
    let mut order2 = order_referring_to_counterparty();
    order2["#value"]["Ref"] = json!("b5c6d7e8-2222-11ee-b9d1-0242ac120002");
    order2["#value"]["Контрагент"] = json!("c0c0c0c0-2222-11ee-b9d1-0242ac120002");
    let mut cp2 = fixture("catalog-counterparty.json");
    cp2["#value"]["Ref"] = json!("c0c0c0c0-2222-11ee-b9d1-0242ac120002");
    // Keep the only lane busy with a slow blocker so both queue up and travel in one batch.
    erp.inner
        .delay_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let blocker = json!({"type": "Catalog.Blocker", "ref": "blocker", "data": {}});
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &blocker)
            .await
            .0,
        202
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = bridge
        .post_json("central", "central-secret", &json!([order2, cp2]))
        .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(100)).await;
    erp.inner
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    eventually(WAIT, "blocker and second pair delivered", || {
        erp.count() == 5
    })
    .await;
    let refs: Vec<String> = erp.received()[3..]
        .iter()
        .map(|r| r.change["ref"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        refs,
        vec![
            "c0c0c0c0-2222-11ee-b9d1-0242ac120002",
            "b5c6d7e8-2222-11ee-b9d1-0242ac120002"
        ]
    );
    let batches = erp.inner.batches.lock().unwrap().clone();
    assert_eq!(
        batches.last().unwrap().len(),
        2,
        "one lane: both travelled in one batch, reordered"
    );
    bridge.finish().await;
}

async fn with_ignore_a_document_is_delivered_at_once(backend: Backend) {
    let erp = Target::start().await;
    let bridge = Bridge::start(
        backend,
        "ignorerefs",
        &wait_config(&erp.url(), "ignore", r#"delays = ["100ms"]"#),
    )
    .await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &order_referring_to_counterparty(),
        )
        .await;
    assert_eq!(status, 202);
    eventually(WAIT, "order delivered without its counterparty", || {
        erp.count() == 1
    })
    .await;
    bridge.finish().await;
}

async fn target_ref_from_the_answer_rewrites_later_references(backend: Backend) {
    let erp = Target::start().await;
    erp.set_target_ref(|c| (c["type"] == "Catalog.Контрагенты").then(|| "ERP-777".to_string()));
    let bridge = Bridge::start(
        backend,
        "learnref",
        &wait_config(&erp.url(), "ignore", r#"delays = ["100ms"]"#),
    )
    .await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &fixture("catalog-counterparty.json"),
        )
        .await;
    assert_eq!(status, 202);
    eventually(WAIT, "counterparty delivered", || erp.count() == 1).await;
    // The learned pair is visible through the admin API, once lxbridge has read the answer
    // (the target counts the change when it receives it, before it answers).
    let path =
        "/api/v1/remap/erp?type=Catalog.Контрагенты&source=e2f3a4b5-8d4b-11ee-b9d1-0242ac120002";
    let started = Instant::now();
    let learned = loop {
        let answer = admin(&bridge, reqwest::Method::GET, path, None).await;
        if answer.0 != 404 || started.elapsed() > WAIT {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(learned, (200, json!({"target": "ERP-777"})));
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &order_referring_to_counterparty(),
        )
        .await;
    assert_eq!(status, 202);
    eventually(WAIT, "order delivered", || erp.count() == 2).await;
    let order = &erp.received()[1].change;
    assert_eq!(order["data"]["Контрагент"], "ERP-777");
    // A second delivery of the counterparty carries the target's own ref.
    let mut again = fixture("catalog-counterparty.json");
    again["#value"]["Description"] = json!("ООО \"Ромашка-2\"");
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &again)
            .await
            .0,
        202
    );
    eventually(WAIT, "update delivered", || erp.count() == 3).await;
    assert_eq!(erp.received()[2].change["target_ref"], "ERP-777");
    let (s, _) = admin(
        &bridge,
        reqwest::Method::GET,
        "/api/v1/remap/erp?type=Catalog.X&source=nope",
        None,
    )
    .await;
    assert_eq!(s, 404);
    bridge.finish().await;
}

async fn key_match_rule_maps_an_object_known_under_another_ref(backend: Backend) {
    let erp = Target::start().await;
    // The target knows the counterparty with ИНН 7701234567 as ERP-1 (it answers so once).
    erp.set_target_ref(|c| {
        (c["ref"] == "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002").then(|| "ERP-1".to_string())
    });
    let config = wait_config(&erp.url(), "ignore", r#"delays = ["100ms"]"#).replace(
        r#"[route.mapping.types."Document.ЗаказКлиента"]"#,
        "[route.mapping.types.\"Catalog.Контрагенты\"]\nkey = \"ИНН\"\n[route.mapping.types.\"Document.ЗаказКлиента\"]",
    );
    let bridge = Bridge::start(backend, "keymatch", &config).await;
    assert_eq!(
        bridge
            .post_json(
                "central",
                "central-secret",
                &fixture("catalog-counterparty.json")
            )
            .await
            .0,
        202
    );
    eventually(WAIT, "first counterparty delivered", || erp.count() == 1).await;
    // The same company under another ref (as a second base would have it).
    let mut twin = fixture("catalog-counterparty.json");
    twin["#value"]["Ref"] = json!("77777777-8d4b-11ee-b9d1-0242ac120002");
    assert_eq!(
        bridge.post_json("central", "central-secret", &twin).await.0,
        202
    );
    eventually(WAIT, "twin delivered", || erp.count() == 2).await;
    assert_eq!(
        erp.received()[1].change["target_ref"],
        "ERP-1",
        "matched by ИНН"
    );
    let (s, body) = admin(
        &bridge,
        reqwest::Method::GET,
        "/api/v1/remap/erp?type=Catalog.Контрагенты&source=77777777-8d4b-11ee-b9d1-0242ac120002",
        None,
    )
    .await;
    assert_eq!((s, body), (200, json!({"target": "ERP-1"})));
    // References to the twin are rewritten too.
    let mut order = order_referring_to_counterparty();
    order["#value"]["Контрагент"] = json!("77777777-8d4b-11ee-b9d1-0242ac120002");
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &order)
            .await
            .0,
        202
    );
    eventually(WAIT, "order delivered", || erp.count() == 3).await;
    assert_eq!(erp.received()[2].change["data"]["Контрагент"], "ERP-1");
    bridge.finish().await;
}

async fn wait_counts_only_references_to_types_routed_to_the_target(backend: Backend) {
    let erp = Target::start().await;
    // Proposals (Основание) are not routed to erp: the order must not wait for one.
    let config = wait_config(
        &erp.url(),
        "wait",
        r#"delays = ["200ms", "200ms", "200ms", "200ms"]"#,
    )
    .replace(
        "to = [\"erp\"]\n",
        "to = [\"erp\"]\ntypes = [\"Catalog.*\", \"Document.ЗаказКлиента\"]\n",
    );
    let bridge = Bridge::start(backend, "waitrouted", &config).await;
    let mut order = fixture("document-order.json");
    order["#value"].as_object_mut().unwrap().remove("Товары");
    assert!(order["#value"]["Основание"]["#type"]
        .as_str()
        .unwrap()
        .contains("DocumentRef"));
    assert_eq!(
        bridge
            .post_json("central", "central-secret", &order)
            .await
            .0,
        202
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(erp.count(), 0, "waits for the counterparty");
    assert_eq!(
        bridge
            .post_json(
                "central",
                "central-secret",
                &fixture("catalog-counterparty.json")
            )
            .await
            .0,
        202
    );
    eventually(
        WAIT,
        "counterparty, then the order despite its unrouted Основание",
        || erp.count() == 2,
    )
    .await;
    assert_eq!(erp.received()[1].change["type"], "Document.ЗаказКлиента");
    bridge.finish().await;
}

/// The preview (`lxbridge transform`) and the delivery share the code that decides which
/// references a change waits for: the same order goes through both. Its counterparty's
/// type is routed to the target, so it is waited for; its organisation's is not (it would
/// never arrive), so it is not.
async fn preview_and_delivery_agree_on_what_an_order_waits_for(backend: Backend) {
    let site = Target::start().await;
    // Retry steps long enough for the order to still be waiting when its counterparty comes.
    let base = BASE.replace(
        r#"delays = ["100ms", "200ms"]"#,
        r#"delays = ["300ms", "300ms", "300ms", "300ms", "300ms"]"#,
    );
    let config = format!(
        r#"{base}
[[node]]
name = "site"
token = "t"
deliver = {{ mode = "push", url = "{url}", missing_refs = "wait", concurrency = 1 }}
[[route]]
name = "orders"
from = "central"
to = ["site"]
types = ["Document.*"]
[route.mapping.types."Document.ЗаказКлиента"]
keep = ["Number", "Контрагент", "Организация"]
refs = {{ "Контрагент" = "Catalog.Контрагенты", "Организация" = "Catalog.Организации" }}
[[route]]
name = "partners"
from = "central"
to = ["site"]
types = ["Catalog.Контрагенты"]
"#,
        url = site.url()
    );
    let bridge = Bridge::start(backend, "previewrefs", &config).await;
    // Without its `Основание`, a typed reference to a document type the route also brings.
    let mut order = fixture("document-order.json");
    order["#value"].as_object_mut().unwrap().remove("Основание");
    let preview =
        lxbridge::deliver::preview::run(&bridge.state().config, "orders", &order.to_string())
            .expect("the preview runs");
    assert_eq!(preview.len(), 1, "{preview:?}");
    let preview: Value = serde_json::from_str(&preview[0]).unwrap();
    assert_eq!(preview["outcome"], "deliver", "{preview}");
    let counterparty = "e2f3a4b5-8d4b-11ee-b9d1-0242ac120002";
    assert_eq!(
        preview["waits_for"],
        json!([{"type": "Catalog.Контрагенты", "ref": counterparty}]),
        "only the routed reference is waited for: {preview}"
    );
    let referenced: Vec<&str> = preview["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert!(referenced.contains(&"Catalog.Организации"), "{preview}");

    // The delivery waits for exactly that reference, and for nothing else.
    let (status, _) = bridge.post_json("central", "central-secret", &order).await;
    assert_eq!(status, 202);
    assert_order_waits_for(&bridge, &site, counterparty).await;
    let (status, _) = bridge
        .post_json(
            "central",
            "central-secret",
            &fixture("catalog-counterparty.json"),
        )
        .await;
    assert_eq!(status, 202);
    eventually(WAIT, "counterparty then order", || site.count() == 2).await;
    let received = site.received();
    let delivered = received
        .iter()
        .find(|r| r.change["type"] == "Document.ЗаказКлиента")
        .expect("the order arrived");
    assert_eq!(
        delivered.change["data"], preview["change"]["data"],
        "the target got what the preview showed"
    );

    // Without the routed reference, the preview waits for nothing and the order goes at once.
    let mut alone = order.clone();
    alone["#value"]["Ref"] = json!("b5c6d7e8-3333-11ee-b9d1-0242ac120002");
    alone["#value"]
        .as_object_mut()
        .unwrap()
        .remove("Контрагент");
    let preview =
        lxbridge::deliver::preview::run(&bridge.state().config, "orders", &alone.to_string())
            .expect("the preview runs");
    let preview: Value = serde_json::from_str(&preview[0]).unwrap();
    assert!(preview.get("waits_for").is_none(), "{preview}");
    let (status, _) = bridge.post_json("central", "central-secret", &alone).await;
    assert_eq!(status, 202);
    eventually(WAIT, "the order without a routed reference", || {
        site.count() == 3
    })
    .await;
    bridge.finish().await;
}

both_backends!(
    two_targets_receive_exactly_their_shapes,
    failing_and_endless_scripts_dead_letter_while_others_flow,
    with_wait_a_document_arrives_only_after_its_counterparty,
    with_ignore_a_document_is_delivered_at_once,
    target_ref_from_the_answer_rewrites_later_references,
    key_match_rule_maps_an_object_known_under_another_ref,
    wait_counts_only_references_to_types_routed_to_the_target,
    preview_and_delivery_agree_on_what_an_order_waits_for,
);

/// `config/commerceml-sites.toml`, the example of docs/commerceml.md ("From a 1C base's
/// changes"): it validates, the docs show the same mapping, and the preview turns the 1C
/// samples into the CommerceML elements a site is sent, which the package writes as 1C would.
#[test]
fn the_commerceml_sites_example_maps_1c_changes_to_commerceml() {
    use lxbridge::commerceml::package::{import_file, offers_file, Ids};
    use lxbridge::commerceml::{Reader, Written};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("config/commerceml-sites.toml");
    let config = lxbridge::config::Config::load(&path).expect("the example reads");
    assert_eq!(
        config.validate(),
        Vec::<String>::new(),
        "{}",
        path.display()
    );

    // The route's types and mapping are those docs/commerceml.md and the README show.
    let route_of = |text: &str| -> Option<toml::Value> {
        let table: toml::Table = toml::from_str(text).ok()?;
        let routes = table.get("route")?.as_array()?;
        let route = routes
            .iter()
            .find(|r| r.get("name").and_then(|n| n.as_str()) == Some("central-to-sites"))?;
        Some(toml::Value::Array(vec![
            route.get("types")?.clone(),
            route.get("mapping")?.clone(),
        ]))
    };
    let example = route_of(&std::fs::read_to_string(&path).unwrap()).expect("the route");
    for page in ["docs/commerceml.md", "README.md"] {
        let text = std::fs::read_to_string(root.join(page)).unwrap();
        let shown: Vec<toml::Value> = text
            .split("```toml fragment\n")
            .skip(1)
            .filter_map(|block| route_of(block.split("\n```").next().unwrap()))
            .collect();
        assert_eq!(
            shown,
            std::slice::from_ref(&example),
            "{page} shows the example's mapping once"
        );
    }

    let preview = |name: &str| -> Value {
        let lines = lxbridge::deliver::preview::run(
            &config,
            "central-to-sites",
            &fixture(name).to_string(),
        )
        .expect("the preview runs");
        let lines: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let targets: Vec<&str> = lines
            .iter()
            .map(|l| l["target"].as_str().unwrap())
            .collect();
        assert_eq!(targets, ["shop", "store"], "{name}");
        assert_eq!(
            lines[0]["change"], lines[1]["change"],
            "{name}: one mapping"
        );
        assert_eq!(lines[0]["outcome"], "deliver", "{name}: {}", lines[0]);
        lines[0]["change"].clone()
    };
    let guid = "5f1c2a3e-8d4b-11ee-b9d1-0242ac120002";
    let product = preview("catalog-nomenclature.json");
    assert_eq!(
        (&product["type"], &product["ref"], &product["op"]),
        (&json!("CommerceML.Товар"), &json!(guid), &json!("upsert"))
    );
    assert_eq!(
        product["data"],
        json!({
            "Наименование": "Стол письменный «Эргономик» 120×60",
            "Артикул": "СТ-120-60",
            "Описание": "Столешница ЛДСП 25 мм,\nкромка ПВХ; \"премиум\"",
            "БазоваяЕдиница": {"@Код": "796", "@НаименованиеПолное": "Штука",
                               "@МеждународноеСокращение": "PCE", "#text": "шт"}
        })
    );
    let offer = preview("register-prices.json");
    assert_eq!(
        (&offer["type"], &offer["ref"], &offer["op"]),
        (
            &json!("CommerceML.Предложение"),
            &json!(guid),
            &json!("upsert")
        ),
        "the offer's ref is its product's GUID"
    );
    assert_eq!(
        offer["data"],
        json!({"Цены": {"Цена": {"ИдТипаЦены": "1b2c3d4e-8d4b-11ee-b9d1-0242ac120002",
                                 "ЦенаЗаЕдиницу": 18450, "Валюта": "RUB"}}})
    );
    let deleted = preview("object-deletion.json");
    assert_eq!(
        (&deleted["type"], &deleted["op"], &deleted["data"]),
        (
            &json!("CommerceML.Товар"),
            &json!("delete"),
            &json!({"Статус": "Удален"})
        )
    );

    // What the site is sent: Ид first, the deletion as the child element, the price type
    // named; read back, the same elements.
    fn written(c: &Value) -> Written<'_> {
        Written {
            name: if c["type"] == "CommerceML.Товар" {
                "Товар"
            } else {
                "Предложение"
            },
            reference: c["ref"].as_str().unwrap(),
            deleted: c["op"] == "delete",
            data: Some(&c["data"]),
        }
    }
    let ids = Ids {
        catalog: "lxbridge",
        classifier: "lxbridge",
    };
    let formed = "2026-12-02T10:00:00";
    let import = import_file(
        &[],
        &[],
        &[written(&product), written(&deleted)],
        formed,
        ids,
    );
    let offers = offers_file(&[written(&offer)], formed, ids);
    let (import_text, offers_text) = (
        String::from_utf8(import.clone()).unwrap(),
        String::from_utf8(offers.clone()).unwrap(),
    );
    assert!(
        import_text.contains(&format!("<Товар><Ид>{guid}</Ид>")),
        "{import_text}"
    );
    assert!(
        import_text.contains(
            "<Товар><Ид>0a1b2c3d-8d4b-11ee-b9d1-0242ac120002</Ид><Статус>Удален</Статус></Товар>"
        ),
        "{import_text}"
    );
    assert!(
        offers_text.contains("<ТипыЦен><ТипЦены><Ид>1b2c3d4e-8d4b-11ee-b9d1-0242ac120002</Ид><Наименование>1b2c3d4e-8d4b-11ee-b9d1-0242ac120002</Наименование><Валюта>RUB</Валюта></ТипЦены></ТипыЦен>"),
        "{offers_text}"
    );
    let read: Vec<(String, String, bool)> = Reader::new(import.as_slice())
        .chain(Reader::new(offers.as_slice()))
        .map(|e| e.expect("the package reads"))
        .map(|e| (e.kind.to_string(), e.reference, e.deleted))
        .collect();
    assert_eq!(
        read,
        [
            ("CommerceML.Товар".to_string(), guid.to_string(), false),
            (
                "CommerceML.Товар".to_string(),
                "0a1b2c3d-8d4b-11ee-b9d1-0242ac120002".to_string(),
                true
            ),
            (
                "CommerceML.Предложение".to_string(),
                guid.to_string(),
                false
            ),
        ]
    );
}
