//! The writer, the reader's inverse: [`element`] turns the JSON of an element (as the reader
//! gives it, the rule is in the `commerceml` module doc) back into XML, and [`documents`]
//! writes the whole answer to 1C's `type=sale&mode=query`, its orders as `Документ`s.
//!
//! Inside: a `Writer` appends to a `String` and knows the encoding the text will be encoded
//! in, so that it leaves out the names that encoding can't spell (a name can't be a numeric
//! character reference, text and attribute values can: `encoding_rs` writes `&#NNNN;` for
//! the characters the encoding lacks, which reads back as the character itself).
//!
//! What can't be XML is left out, silently: a key that is not an XML name (empty, starting
//! with a digit, with spaces, a namespace prefix `x:` or a `#` other than `"#text"`), the
//! attribute `"@xmlns"` (a namespace declaration, not data), an attribute or `"#text"` whose
//! value is an object or an array, and the characters XML 1.0 forbids (control characters
//! but tab, line feed and carriage return; U+FFFE, U+FFFF). Such data reads back without
//! them; everything else reads back as it was written, but for an element's whitespace
//! around its children (trimmed by the reader) and `null`, `{}` or a number, which read back
//! as the string they were written as.

use super::ROOT;
use encoding_rs::{Encoding, UTF_8};
use serde_json::{Map, Value};

/// The `ВерсияСхемы` of the answer [`documents`] writes (Bitrix answers 1C with 2.05).
pub const SCHEMA_VERSION: &str = "2.05";
/// The namespace of CommerceML 2.
pub const NAMESPACE: &str = "urn:1C.ru:commerceml_2";

/// Writes `value` (the JSON of an element, as the reader produces it) as the element `name`
/// into `out`: object keys → child elements in key order (`"@x"` keys → attributes,
/// `"#text"` → text, written before the children), arrays → the element repeated (an empty
/// one: nothing), strings → escaped text, numbers/bools → their text, null → an empty
/// element. A `name` or key that is not an XML name is skipped (nothing is written for it,
/// and nothing says so), and so is the rest the module doc lists.
pub fn element(out: &mut String, name: &str, value: &Value) {
    Writer {
        out,
        encoding: UTF_8,
    }
    .element(name, value);
}

/// One element of a file to write: its XML name ("Документ", "Товар", …), its Ид, deleted or
/// not, its data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Written<'a> {
    /// Its XML name: `Документ` for [`documents`].
    pub name: &'a str,
    /// Its `Ид`, written first when `data` has none.
    pub reference: &'a str,
    /// Marked deleted: `<ПометкаУдаления>true</ПометкаУдаления>` unless `data` says itself.
    pub deleted: bool,
    /// The element as JSON, an object (anything else is its text; `None`, just the `Ид`).
    pub data: Option<&'a Value>,
}

/// The `КоммерческаяИнформация` answer to 1C's `type=sale&mode=query`: the XML declaration with
/// the given encoding, the root `<КоммерческаяИнформация xmlns="urn:1C.ru:commerceml_2"
/// ВерсияСхемы="2.05" ДатаФормирования="<formed>">`, one `<Документ>` per item (whatever its
/// `name`), one a line. An empty list gives the root element alone (never an empty body).
///
/// Each `Документ`: when its data lacks `"Ид"`, `<Ид>reference</Ид>` first; then the data as
/// [`element`] writes it; deleted, and the data has no `"ПометкаУдаления"`, then
/// `<ПометкаУдаления>true</ПометкаУдаления>` last (with no data at all: just `Ид` and that).
///
/// The bytes are in `encoding`'s output encoding (`encoding_rs`: UTF-16 and `replacement`
/// write UTF-8, without a BOM), which the declaration names; a character it lacks is a
/// numeric character reference `&#NNNN;`, and a key whose name it can't spell is skipped.
pub fn documents(items: &[Written<'_>], formed: &str, encoding: &'static Encoding) -> Vec<u8> {
    let encoding = encoding.output_encoding();
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"{}\"?>\n<{ROOT} xmlns=\"{NAMESPACE}\" \
         ВерсияСхемы=\"{SCHEMA_VERSION}\" ДатаФормирования=\"",
        encoding.name()
    );
    escape(&mut out, formed, true);
    out.push_str("\">\n");
    let mut writer = Writer {
        out: &mut out,
        encoding,
    };
    for item in items {
        writer.document(item);
        writer.out.push('\n');
    }
    out.push_str(&format!("</{ROOT}>\n"));
    // Characters the encoding lacks become `&#NNNN;`: all in text or attribute values, as
    // the names were checked to fit (and the forbidden characters are gone).
    let (bytes, _, _) = encoding.encode(&out);
    bytes.into_owned()
}

/// Appends elements to `out`, leaving out the names `encoding` can't spell.
pub(super) struct Writer<'o> {
    pub(super) out: &'o mut String,
    pub(super) encoding: &'static Encoding,
}

/// How a [`Written`] that is deleted (and whose data doesn't say so) is marked.
#[derive(Clone, Copy)]
pub(super) enum Mark {
    /// `<ПометкаУдаления>true</ПометкаУдаления>` last, as 1C marks an order document.
    Child,
    /// `<Статус>Удален</Статус>` last, which sites' importers (1C-Bitrix's, WooCommerce
    /// plugins') look for, and the reader reads as deleted too.
    Status,
}

impl Writer<'_> {
    pub(super) fn element(&mut self, name: &str, value: &Value) {
        if !self.fits(name) {
            return;
        }
        match value {
            Value::Array(items) => items.iter().for_each(|item| self.element(name, item)),
            Value::Object(fields) => {
                let start = self.open(name, fields);
                self.text(fields);
                self.children(fields);
                self.close(name, start);
            }
            Value::Null => {
                let start = self.open(name, &Map::new());
                self.close(name, start);
            }
            scalar => {
                let start = self.open(name, &Map::new());
                escape(self.out, &scalar_text(scalar).unwrap_or_default(), false);
                self.close(name, start);
            }
        }
    }

    /// One `Документ` of [`documents`].
    fn document(&mut self, item: &Written<'_>) {
        self.item("Документ", item, Mark::Child, &mut |_| {});
    }

    /// `item` as the element `name`: `<Ид>` first when its data has none, its data, then
    /// what `inner` writes (nested elements), and its deletion mark unless the data has one.
    pub(super) fn item(
        &mut self,
        name: &str,
        item: &Written<'_>,
        mark: Mark,
        inner: &mut dyn FnMut(&mut Writer<'_>),
    ) {
        let empty = Map::new();
        let (fields, text) = match item.data {
            Some(Value::Object(fields)) => (fields, None),
            Some(Value::Null) | None => (&empty, None),
            Some(other) => (&empty, Some(other)),
        };
        let says_deleted = ["@Статус", "Статус", "ПометкаУдаления"]
            .iter()
            .any(|k| fields.contains_key(*k));
        let marked = item.deleted && !says_deleted;
        let start = self.open(name, fields);
        if !fields.contains_key("Ид") {
            self.element("Ид", &Value::String(item.reference.to_owned()));
        }
        if let Some(text) = text.and_then(scalar_text) {
            escape(self.out, &text, false);
        }
        self.text(fields);
        self.children(fields);
        inner(self);
        match mark {
            _ if !marked => {}
            Mark::Child => self.element("ПометкаУдаления", &Value::String("true".into())),
            Mark::Status => self.element("Статус", &Value::String("Удален".into())),
        }
        self.close(name, start);
    }

    /// `<name` and the `"@x"` fields as attributes, then `>`: the length of `out` before
    /// the `>`, for [`Writer::close`].
    fn open(&mut self, name: &str, fields: &Map<String, Value>) -> usize {
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in fields {
            let Some(attribute) = key.strip_prefix('@') else {
                continue;
            };
            let Some(value) = scalar_text(value) else {
                continue;
            };
            if attribute == "xmlns" || !self.fits(attribute) {
                continue;
            }
            self.out.push(' ');
            self.out.push_str(attribute);
            self.out.push_str("=\"");
            escape(self.out, &value, true);
            self.out.push('"');
        }
        let start = self.out.len();
        self.out.push('>');
        start
    }

    /// The end tag, or `/>` when nothing was written since the start tag's `>`.
    fn close(&mut self, name: &str, start: usize) {
        if self.out.len() == start + 1 {
            self.out.truncate(start);
            self.out.push_str("/>");
        } else {
            self.out.push_str("</");
            self.out.push_str(name);
            self.out.push('>');
        }
    }

    fn text(&mut self, fields: &Map<String, Value>) {
        if let Some(text) = fields.get("#text").and_then(scalar_text) {
            escape(self.out, &text, false);
        }
    }

    fn children(&mut self, fields: &Map<String, Value>) {
        for (key, value) in fields {
            if !key.starts_with('@') {
                self.element(key, value);
            }
        }
    }

    /// An XML name without a namespace prefix that the encoding can spell.
    fn fits(&self, name: &str) -> bool {
        is_name(name) && (self.encoding == UTF_8 || !self.encoding.encode(name).2)
    }
}

/// The text of a string, number, bool or null (`""`); none for an object or array.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Null => Some(String::new()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// `text` escaped into `out`: `&`, `<`, `>` (and in an attribute `"`, tab and line feed,
/// which the reader would read as spaces); a carriage return as `&#13;` (else read as a line
/// feed); the characters XML 1.0 forbids dropped.
fn escape(out: &mut String, text: &str, attribute: bool) {
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            '"' if attribute => out.push_str("&quot;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\t' | '\n' => out.push(character),
            '\u{0}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}' => {}
            _ => out.push(character),
        }
    }
}

/// An XML 1.0 `Name` without `:` (an NCName: the reader drops prefixes, so keys have none).
fn is_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters.next().is_some_and(name_start) && characters.all(name_char)
}

fn name_start(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
        | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
        | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
        | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

fn name_char(c: char) -> bool {
    name_start(c)
        || matches!(c,
            '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commerceml::{Element, Header, Reader, DOCUMENT, GROUP, OFFER, PRODUCT, PROPERTY};
    use encoding_rs::WINDOWS_1251;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/commerceml/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Every element of `bytes`, and the header; panics on an error.
    fn read(bytes: &[u8]) -> (Vec<Element>, Header) {
        let mut reader = Reader::new(bytes);
        let elements = (&mut reader)
            .map(|item| item.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        (elements, reader.header().clone())
    }

    /// What a round trip must keep of an element (not its line).
    fn kept(elements: &[Element]) -> Vec<(&'static str, &str, bool, &Value)> {
        elements
            .iter()
            .map(|e| (e.kind, e.reference.as_str(), e.deleted, &e.data))
            .collect()
    }

    fn counts(elements: &[Element]) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for element in elements {
            *counts.entry(element.kind).or_insert(0) += 1;
        }
        counts
    }

    /// `elements` written back, each inside its own sections (so they keep their order).
    fn rewritten(elements: &[Element]) -> String {
        let mut out = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{ROOT}>\n");
        for e in elements {
            let (name, sections) = match e.kind {
                GROUP => ("Группа", ["Классификатор", "Группы"].as_slice()),
                PROPERTY => ("Свойство", ["Классификатор", "Свойства"].as_slice()),
                PRODUCT => ("Товар", ["Каталог", "Товары"].as_slice()),
                OFFER => (
                    "Предложение",
                    ["ПакетПредложений", "Предложения"].as_slice(),
                ),
                DOCUMENT => ("Документ", [].as_slice()),
                other => panic!("{other}"),
            };
            sections
                .iter()
                .for_each(|s| out.push_str(&format!("<{s}>")));
            element(&mut out, name, &e.data);
            sections
                .iter()
                .rev()
                .for_each(|s| out.push_str(&format!("</{s}>")));
            out.push('\n');
        }
        out + "</" + ROOT + ">\n"
    }

    #[test]
    fn the_real_files_read_back_as_they_were_read() {
        let files = [
            (
                "import0_1.xml",
                [(GROUP, 1), (PROPERTY, 12), (PRODUCT, 36)].as_slice(),
            ),
            (
                "import0_1_with_nested_groups.xml",
                &[(GROUP, 13), (PROPERTY, 20), (PRODUCT, 283)],
            ),
            ("offers0_1.xml", &[(OFFER, 44)]),
            ("bitrix-query-response-full.xml", &[(DOCUMENT, 2)]),
        ];
        for (file, expected) in files {
            let (first, _) = read(&fixture(file));
            assert_eq!(
                counts(&first),
                BTreeMap::from_iter(expected.iter().copied())
            );
            let text = rewritten(&first);
            let (again, _) = read(text.as_bytes());
            assert_eq!(again.len(), first.len(), "{file}");
            for (was, is) in kept(&first).iter().zip(kept(&again)) {
                assert_eq!(*was, is, "{file}");
            }
        }
        // The orders again, as the answer to 1C in the fixture's own encoding.
        let (orders, _) = read(&fixture("bitrix-query-response-full.xml"));
        let written: Vec<Written<'_>> = orders
            .iter()
            .map(|e| Written {
                name: "Документ",
                reference: &e.reference,
                deleted: e.deleted,
                data: Some(&e.data),
            })
            .collect();
        let bytes = documents(&written, "2021-02-12T17:03:19", WINDOWS_1251);
        assert_eq!(kept(&read(&bytes).0), kept(&orders));
    }

    #[test]
    fn no_documents_is_the_root_alone() {
        let bytes = documents(&[], "2024-05-06T07:08:09", UTF_8);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"),
            "{text}"
        );
        let root = "<КоммерческаяИнформация xmlns=\"urn:1C.ru:commerceml_2\" \
                    ВерсияСхемы=\"2.05\" ДатаФормирования=\"2024-05-06T07:08:09\">\n\
                    </КоммерческаяИнформация>\n";
        assert_eq!(text.split_once('\n').unwrap().1, root);
        let mut reader = Reader::new(bytes.as_slice());
        assert_eq!((&mut reader).count(), 0, "no element and no error");
        assert_eq!(
            reader.header().formed.as_deref(),
            Some("2024-05-06T07:08:09")
        );
        assert_eq!(reader.header().schema_version.as_deref(), Some("2.05"));
    }

    #[test]
    fn orders_in_windows_1251_keep_what_it_lacks_as_references() {
        let first = json!({
            "Номер": "1", "Комментарий": "<script>alert(1)</script> \"&' ✓ 😀",
            "Сумма": {"@Валюта": "руб \"&'<>✓", "#text": "10.50"},
            "Товары": {"Товар": [{"Ид": "a", "Наименование": "Ёлка"}, {"Ид": "b"}]}
        });
        let second = json!({"Ид": " 2 ", "Номер": "2", "Строки": "а\r\nб\tв"});
        let items = [
            Written {
                name: "Документ",
                reference: "1",
                deleted: false,
                data: Some(&first),
            },
            Written {
                name: "Документ",
                reference: "2",
                deleted: false,
                data: Some(&second),
            },
        ];
        let bytes = documents(&items, "2024-01-01T00:00:00", WINDOWS_1251);
        assert!(std::str::from_utf8(&bytes).is_err(), "not windows-1251");
        let (text, malformed) = WINDOWS_1251.decode_without_bom_handling(&bytes);
        assert!(!malformed);
        assert!(text.starts_with("<?xml version=\"1.0\" encoding=\"windows-1251\"?>\n"));
        let comment = "<Комментарий>&lt;script&gt;alert(1)&lt;/script&gt; \"&amp;' &#10003; \
                       &#128512;</Комментарий>";
        assert!(text.contains(comment), "{text}");
        assert!(
            text.contains("Валюта=\"руб &quot;&amp;'&lt;&gt;&#10003;\""),
            "{text}"
        );
        let (elements, _) = read(&bytes);
        let mut expected = first.clone();
        expected["Ид"] = json!("1");
        let references: Vec<_> = elements.iter().map(|e| e.reference.as_str()).collect();
        assert_eq!(references, ["1", "2"]);
        assert_eq!((&elements[0].data, &elements[1].data), (&expected, &second));
        assert!(elements.iter().all(|e| e.kind == DOCUMENT && !e.deleted));
    }

    #[test]
    fn a_deleted_document_reads_back_deleted() {
        let data = json!({"Ид": "7", "Номер": "7"});
        let items = [
            Written {
                name: "Документ",
                reference: "7",
                deleted: true,
                data: Some(&data),
            },
            Written {
                name: "Документ",
                reference: "8",
                deleted: true,
                data: None,
            },
            Written {
                name: "Документ",
                reference: "9",
                deleted: false,
                data: None,
            },
        ];
        let (elements, _) = read(&documents(&items, "2024-01-01T00:00:00", UTF_8));
        let marks: Vec<_> = elements
            .iter()
            .map(|e| (e.reference.as_str(), e.deleted))
            .collect();
        assert_eq!(marks, [("7", true), ("8", true), ("9", false)]);
        let mark = json!({"Ид": "7", "Номер": "7", "ПометкаУдаления": "true"});
        assert_eq!(elements[0].data, mark);
        assert_eq!(
            elements[1].data,
            json!({"Ид": "8", "ПометкаУдаления": "true"})
        );
        assert_eq!(elements[2].data, json!({"Ид": "9"}));
    }

    fn written(name: &str, value: Value) -> String {
        let mut out = String::new();
        element(&mut out, name, &value);
        out
    }

    #[test]
    fn values_become_xml_by_the_rule() {
        let value = json!({"@a": "1 & \"2\" <3>\t\n\r", "@n": 5, "#text": "до",
                           "b": ["x", "", null, 1.5, true], "c": {"@d": "e"}, "f": []});
        let expected = "<e a=\"1 &amp; &quot;2&quot; &lt;3&gt;&#9;&#10;&#13;\" n=\"5\">до\
                        <b>x</b><b/><b/><b>1.5</b><b>true</b><c d=\"e\"/></e>";
        assert_eq!(written("e", value), expected);
        assert_eq!(
            written("e", json!("a<b>&c\r\n\u{1}\u{FFFF}")),
            "<e>a&lt;b&gt;&amp;c&#13;\n</e>"
        );
        assert_eq!(written("e", json!(null)), "<e/>");
        assert_eq!(written("e", json!([])), "");
    }

    #[test]
    fn what_is_not_an_xml_name_is_left_out() {
        let value = json!({"": 1, "1a": 2, "a b": 3, "x:y": 4, "#other": 5, "@": 6,
                           "@1": 7, "@xmlns": "urn:x", "@ok": {"no": 1}, "#text": ["no"],
                           "ok-1.Ё_": {"<": 8}, "@a·b": "c"});
        assert_eq!(written("e", value), "<e a·b=\"c\"><ok-1.Ё_/></e>");
        assert_eq!(written("1e", json!("x")), "");
        assert_eq!(written("", json!({"a": 1})), "");
        // What windows-1251 can't spell in a name is left out of its documents, not broken.
        let data = json!({"Знакα": "1", "Ключ": "✓", "@атрибут😀": "2"});
        let item = Written {
            name: "Документ",
            reference: "r",
            deleted: false,
            data: Some(&data),
        };
        let bytes = documents(&[item], "now", WINDOWS_1251);
        assert_eq!(read(&bytes).0[0].data, json!({"Ид": "r", "Ключ": "✓"}));
        let bytes = documents(&[item], "now", UTF_8);
        let mut all = data.clone();
        all["Ид"] = json!("r");
        assert_eq!(read(&bytes).0[0].data, all);
    }

    #[test]
    fn whitespace_and_line_ends_read_back_as_written() {
        let value = json!({"@a": " x\ty\nz\r\n ", "t": " 100 RUB ", "s": "  ", "r": "a\rb\r\nc",
                           "m": {"@k": "v", "#text": " mixed "}, "Ид": "1"});
        let text = format!("<{ROOT}>{}</{ROOT}>", written("Документ", value.clone()));
        let (elements, _) = read(text.as_bytes());
        assert_eq!(elements[0].data, value);
    }
}
