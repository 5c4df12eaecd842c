//! The files lxbridge uploads to a site as 1C's site exchange does: [`import_file`] (a
//! `Классификатор` of groups and properties, and a `Каталог СодержитТолькоИзменения="true"` of
//! products) and [`offers_file`] (a `ПакетПредложений СодержитТолькоИзменения="true"`), each
//! element its data written back by the reader's rule, so that the reader reads the same
//! elements out of them.
//!
//! Groups are nested as 1C nests them when a group's parent (`"ИдРодителя"`) is in the same
//! file, else written at the top with their `ИдРодителя`. A deleted element whose data has no
//! mark gets `<Статус>Удален</Статус>`, the mark sites' importers look for. The offers' package names
//! the price types and warehouses its offers use (`ТипыЦен`, `Склады`: their `Ид` as their
//! name, since a change carries only the offer), which a site maps prices and stocks by.

use super::write::{Mark, Writer, Written, NAMESPACE};
use super::ROOT;
use encoding_rs::UTF_8;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The `Ид`s a package carries for its catalog and classifier (a site keys its catalog by
/// them).
#[derive(Debug, Clone, Copy)]
pub struct Ids<'a> {
    pub catalog: &'a str,
    pub classifier: &'a str,
}

/// The `ВерсияСхемы` of the files (what 1C's typical configurations write).
pub const PACKAGE_VERSION: &str = "2.07";

/// `import.xml`: `groups` and `properties` in the `Классификатор`, `products` in the
/// `Каталог` (each list may be empty; the `Классификатор` is left out with neither).
pub fn import_file(
    groups: &[Written<'_>],
    properties: &[Written<'_>],
    products: &[Written<'_>],
    formed: &str,
    ids: Ids<'_>,
) -> Vec<u8> {
    let mut out = head(formed);
    let mut w = Writer {
        out: &mut out,
        encoding: UTF_8,
    };
    if !groups.is_empty() || !properties.is_empty() {
        w.out.push_str("<Классификатор>");
        w.element("Ид", &text(ids.classifier));
        w.element("Наименование", &text("Классификатор (lxbridge)"));
        if !groups.is_empty() {
            w.out.push_str("<Группы>");
            write_groups(&mut w, groups);
            w.out.push_str("</Группы>");
        }
        if !properties.is_empty() {
            w.out.push_str("<Свойства>");
            for p in properties {
                w.item("Свойство", p, Mark::Status, &mut |_| {});
            }
            w.out.push_str("</Свойства>");
        }
        w.out.push_str("</Классификатор>\n");
    }
    if !products.is_empty() {
        w.out.push_str("<Каталог СодержитТолькоИзменения=\"true\">");
        w.element("Ид", &text(ids.catalog));
        w.element("ИдКлассификатора", &text(ids.classifier));
        w.element("Наименование", &text("Каталог (lxbridge)"));
        w.out.push_str("<Товары>\n");
        for p in products {
            w.item("Товар", p, Mark::Status, &mut |_| {});
            w.out.push('\n');
        }
        w.out.push_str("</Товары></Каталог>\n");
    }
    finish(out)
}

/// `offers.xml`: `offers` in a `ПакетПредложений` with the price types and warehouses they
/// name.
pub fn offers_file(offers: &[Written<'_>], formed: &str, ids: Ids<'_>) -> Vec<u8> {
    let mut out = head(formed);
    let mut w = Writer {
        out: &mut out,
        encoding: UTF_8,
    };
    w.out
        .push_str("<ПакетПредложений СодержитТолькоИзменения=\"true\">");
    w.element("Ид", &text(&format!("{}#", ids.catalog)));
    w.element("Наименование", &text("Пакет предложений (lxbridge)"));
    w.element("ИдКаталога", &text(ids.catalog));
    w.element("ИдКлассификатора", &text(ids.classifier));
    let (prices, stores) = named(offers);
    if !prices.is_empty() {
        w.out.push_str("<ТипыЦен>");
        for (id, currency) in &prices {
            w.out.push_str("<ТипЦены>");
            w.element("Ид", &text(id));
            w.element("Наименование", &text(id));
            if let Some(currency) = currency {
                w.element("Валюта", &text(currency));
            }
            w.out.push_str("</ТипЦены>");
        }
        w.out.push_str("</ТипыЦен>");
    }
    if !stores.is_empty() {
        w.out.push_str("<Склады>");
        for id in &stores {
            w.out.push_str("<Склад>");
            w.element("Ид", &text(id));
            w.element("Наименование", &text(id));
            w.out.push_str("</Склад>");
        }
        w.out.push_str("</Склады>");
    }
    w.out.push_str("<Предложения>\n");
    for offer in offers {
        w.item("Предложение", offer, Mark::Status, &mut |_| {});
        w.out.push('\n');
    }
    w.out.push_str("</Предложения></ПакетПредложений>\n");
    finish(out)
}

fn head(formed: &str) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{ROOT} xmlns=\"{NAMESPACE}\" \
         ВерсияСхемы=\"{PACKAGE_VERSION}\" ДатаФормирования=\""
    );
    out.push_str(&formed.replace(['"', '<', '&'], ""));
    out.push_str("\">\n");
    out
}

fn finish(mut out: String) -> Vec<u8> {
    out.push_str(&format!("</{ROOT}>\n"));
    out.into_bytes()
}

fn text(s: &str) -> Value {
    Value::String(s.to_owned())
}

/// The groups, each under its parent when the parent is among them.
fn write_groups(w: &mut Writer<'_>, groups: &[Written<'_>]) {
    let ids: BTreeSet<&str> = groups.iter().map(|g| g.reference).collect();
    let mut children: HashMap<&str, Vec<&Written<'_>>> = HashMap::new();
    let mut roots = Vec::new();
    for g in groups {
        match parent(g).filter(|p| ids.contains(p) && *p != g.reference) {
            Some(p) => children.entry(p).or_default().push(g),
            None => roots.push(g),
        }
    }
    // A cycle of parents has no root: its groups are written at the top.
    let mut written = BTreeSet::new();
    for g in roots {
        write_group(w, g, &children, &mut written);
    }
    for g in groups {
        if !written.contains(g.reference) {
            w.item("Группа", g, Mark::Status, &mut |_| {});
            written.insert(g.reference);
        }
    }
}

fn write_group<'a>(
    w: &mut Writer<'_>,
    group: &'a Written<'a>,
    children: &HashMap<&str, Vec<&'a Written<'a>>>,
    written: &mut BTreeSet<&'a str>,
) {
    if !written.insert(group.reference) {
        return;
    }
    let kids = children.get(group.reference).cloned().unwrap_or_default();
    w.item("Группа", group, Mark::Status, &mut |w| {
        if kids.is_empty() {
            return;
        }
        w.out.push_str("<Группы>");
        for kid in &kids {
            write_group(w, kid, children, written);
        }
        w.out.push_str("</Группы>");
    });
}

fn parent<'a>(group: &Written<'a>) -> Option<&'a str> {
    group.data?.get("ИдРодителя")?.as_str()
}

/// The price types (with the first currency seen) and warehouses the offers name.
fn named(offers: &[Written<'_>]) -> (BTreeMap<String, Option<String>>, BTreeSet<String>) {
    let mut prices = BTreeMap::new();
    let mut stores = BTreeSet::new();
    for data in offers.iter().filter_map(|o| o.data) {
        for price in each(data.get("Цены").and_then(|p| p.get("Цена"))) {
            if let Some(id) = price.get("ИдТипаЦены").and_then(Value::as_str) {
                let currency = price.get("Валюта").and_then(Value::as_str);
                prices
                    .entry(id.to_owned())
                    .or_insert_with(|| currency.map(str::to_owned));
            }
        }
        for store in each(data.get("Склад")) {
            if let Some(id) = store.get("@ИдСклада").and_then(Value::as_str) {
                stores.insert(id.to_owned());
            }
        }
    }
    (prices, stores)
}

/// A value that is one object or an array of them, as a list.
fn each(value: Option<&Value>) -> Vec<&Value> {
    match value {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commerceml::{Element, Reader, GROUP, OFFER, PRODUCT, PROPERTY};

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/commerceml/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn read(bytes: &[u8]) -> Vec<Element> {
        Reader::new(bytes)
            .map(|item| item.unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    fn written<'a>(elements: &'a [Element], kind: &'a str) -> Vec<Written<'a>> {
        elements
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| Written {
                name: crate::commerceml::element_name(kind),
                reference: &e.reference,
                deleted: e.deleted,
                data: Some(&e.data),
            })
            .collect()
    }

    /// (kind, ref, deleted, data) of every element, sorted.
    fn facts(elements: &[Element]) -> Vec<(String, String, bool, String)> {
        let mut facts: Vec<_> = elements
            .iter()
            .map(|e| {
                (
                    e.kind.to_string(),
                    e.reference.clone(),
                    e.deleted,
                    e.data.to_string(),
                )
            })
            .collect();
        facts.sort();
        facts
    }

    const IDS: Ids<'static> = Ids {
        catalog: "cat",
        classifier: "cls",
    };

    #[test]
    fn the_real_files_read_back_as_the_same_elements() {
        for (import, offers) in [
            ("import0_1.xml", "offers0_1.xml"),
            ("import0_1_with_nested_groups.xml", "offers0_1.xml"),
        ] {
            let mut original = read(&fixture(import));
            original.extend(read(&fixture(offers)));
            let file = import_file(
                &written(&original, GROUP),
                &written(&original, PROPERTY),
                &written(&original, PRODUCT),
                "2026-12-02T10:00:00",
                IDS,
            );
            let mut again = read(&file);
            again.extend(read(&offers_file(
                &written(&original, OFFER),
                "2026-12-02T10:00:00",
                IDS,
            )));
            assert_eq!(facts(&again), facts(&original), "{import}");
        }
    }

    #[test]
    fn nested_groups_stay_nested_and_a_lone_child_keeps_its_parent() {
        let parent = serde_json::json!({"Ид": "p", "Наименование": "P"});
        let child = serde_json::json!({"Ид": "c", "Наименование": "C", "ИдРодителя": "p"});
        let orphan = serde_json::json!({"Ид": "o", "Наименование": "O", "ИдРодителя": "gone"});
        let groups: Vec<Written<'_>> = [("p", &parent), ("c", &child), ("o", &orphan)]
            .into_iter()
            .map(|(r, d)| Written {
                name: "Группа",
                reference: r,
                deleted: false,
                data: Some(d),
            })
            .collect();
        let file = String::from_utf8(import_file(&groups, &[], &[], "t", IDS)).unwrap();
        let nested = file.find("<Группы><Группа><Ид>c</Ид>").expect(&file);
        assert!(file.find("<Ид>p</Ид>").unwrap() < nested, "{file}");
        let back = read(file.as_bytes());
        let parent_of =
            |r: &str| back.iter().find(|e| e.reference == r).unwrap().data["ИдРодителя"].clone();
        assert_eq!(
            (parent_of("c"), parent_of("o")),
            ("p".into(), "gone".into())
        );
    }

    #[test]
    fn a_deleted_product_without_a_mark_is_marked_and_reads_back_deleted() {
        let data = serde_json::json!({"Ид": "x", "Наименование": "X"});
        let product = Written {
            name: "Товар",
            reference: "x",
            deleted: true,
            data: Some(&data),
        };
        let file = import_file(&[], &[], &[product], "t", IDS);
        let text = String::from_utf8(file.clone()).unwrap();
        assert!(text.contains("<Статус>Удален</Статус></Товар>"), "{text}");
        let back = read(&file);
        assert_eq!((back.len(), back[0].deleted), (1, true));
    }

    #[test]
    fn offers_name_their_price_types_and_warehouses() {
        let original = read(&fixture("offers0_1.xml"));
        let file = offers_file(&written(&original, OFFER), "t", IDS);
        let text = String::from_utf8(file).unwrap();
        assert!(text.contains("<ТипыЦен><ТипЦены><Ид>"), "{text}");
        assert!(text.contains("<ИдКаталога>cat</ИдКаталога>"), "{text}");
    }
}
