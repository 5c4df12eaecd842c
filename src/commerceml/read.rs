//! The streaming reader: [`Reader`] turns a CommerceML file into its elements, one at a time
//! (what comes out, and why, is in the `commerceml` module doc). Inside, in the order bytes
//! go through: `utf8_input` finds the encoding (byte-order mark, else the XML declaration) and
//! puts a `Transcode` (`encoding_rs`, to UTF-8) in front when it is not UTF-8; `Lines` is the
//! read buffer, counting the lines quick-xml consumed; quick-xml's events then open and close
//! a `Capture` per element of the table, whose `Node`s are the XML→JSON rule.
//!
//! Memory: the path of open elements (names only), the element being built (one `Capture`,
//! or one per level of nested groups, each without its nested groups), quick-xml's buffer
//! of one event, and the 64 KiB read buffer (two with a transcoder). An element's own
//! content over the element limit ([`ELEMENT_BYTES_MAX`] unless
//! [`Reader::with_element_limit`] says otherwise) is dropped as soon as it passes the limit
//! and the element is an error; nesting past [`DEPTH_MAX`] is fatal. One text node is held
//! whole while quick-xml reads it.

use super::{
    Element, ElementError, ElementProblem, FileError, FileProblem, Header, ReadError, DOCUMENT,
    GROUP, OFFER, PRODUCT, PROPERTY, ROOT,
};
use encoding_rs::{CoderResult, Decoder, Encoding, UTF_16BE, UTF_16LE, UTF_8};
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::XmlVersion;
use serde_json::{Map, Value};
use std::io::{self, BufRead, Read};

/// The most bytes of names, attribute values and text one element may hold (16 MiB).
pub const ELEMENT_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The deepest nesting of elements a file may have.
pub const DEPTH_MAX: usize = 256;
/// How much of the start of a file is looked at for its byte-order mark and declaration.
const PREFIX_BYTES: u64 = 1024;
/// The size of the read buffer (and of the transcoder's input buffer).
const BUFFER_BYTES: usize = 64 * 1024;
/// The most text of a `СодержитТолькоИзменения` element kept.
const FLAG_BYTES: usize = 64;

type Source<'r> = Box<dyn Read + Send + 'r>;

/// Reads one CommerceML file as an iterator of its elements: `Ok(Element)`, or
/// `Err(ReadError::Element)` for one that can't be read (the next one follows), or one last
/// `Err(ReadError::File)` when the file can't be read on. Ends after the root element closes
/// (anything after it is not read).
pub struct Reader<'r> {
    xml: quick_xml::Reader<Lines<'r>>,
    /// quick-xml's buffer for one event.
    event: Vec<u8>,
    /// The open elements, the root first.
    path: Vec<Open>,
    /// The elements being built: one, or one per level of nested groups.
    captures: Vec<Capture>,
    header: Header,
    /// Inside a `СодержитТолькоИзменения` element of a section.
    flag: Option<Flag>,
    limit: usize,
    peak: usize,
    /// A fatal error found before reading (the encoding), given as the first item.
    pending: Option<FileError>,
    done: bool,
}

/// An open element of the path.
struct Open {
    name: String,
    line: u64,
}

#[derive(Debug, Clone, Copy)]
enum Section {
    Catalog,
    Offers,
}

struct Flag {
    section: Section,
    text: String,
}

/// An element of the table being built.
struct Capture {
    kind: &'static str,
    line: u64,
    /// Its index in the path.
    depth: usize,
    /// The element and its open descendants: `nodes[0]` is the element.
    nodes: Vec<Node>,
    /// Bytes of names, attributes and text held.
    bytes: usize,
    /// Passed the element limit: `nodes` dropped, the rest of the element skipped.
    overflow: bool,
}

/// One XML element being turned into JSON.
struct Node {
    name: String,
    /// `"@attribute"` and child element entries.
    fields: Map<String, Value>,
    text: String,
    children: bool,
}

/// What one XML event did.
enum Step {
    Next,
    Item(Result<Element, ElementError>),
    End,
}

impl<'r> Reader<'r> {
    /// A reader of `input`, a whole CommerceML file (UTF-8, with or without a BOM, or the
    /// encoding its XML declaration names, such as windows-1251). Nothing is read until the
    /// first `next()` but the first 1 KiB, for the encoding.
    pub fn new<R: BufRead + Send + 'r>(input: R) -> Self {
        let (source, pending) = match utf8_input(input) {
            Ok(source) => (source, None),
            Err(error) => (Box::new(io::empty()) as Source<'r>, Some(error)),
        };
        Reader {
            xml: quick_xml::Reader::from_reader(Lines::new(source)),
            event: Vec::new(),
            path: Vec::new(),
            captures: Vec::new(),
            header: Header::default(),
            flag: None,
            limit: ELEMENT_BYTES_MAX,
            peak: 0,
            pending,
            done: false,
        }
    }

    /// The most bytes one element's own content (names, attribute values, text) may hold.
    pub fn with_element_limit(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
    }

    /// What the file said about itself so far.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The line the reader is on (1-based).
    pub fn line(&self) -> u64 {
        self.xml.get_ref().newlines + 1
    }

    /// The most bytes the elements being built held at once so far (names, attribute
    /// values, text): what reading costs beyond the fixed buffers, whatever the file's size.
    pub fn peak_element_bytes(&self) -> usize {
        self.peak
    }

    /// Reads up to the next thing to say.
    fn step(&mut self) -> Result<Step, FileError> {
        let mut buffer = std::mem::take(&mut self.event);
        buffer.clear();
        let step = match self.xml.read_event_into(&mut buffer) {
            Err(quick_xml::Error::Io(error)) => Err(self.fatal(FileProblem::Io(error.to_string()))),
            Err(quick_xml::Error::Encoding(error)) => Err(self.not_xml(format!(
                "{error}: does the XML declaration name the file's encoding?"
            ))),
            Err(error) => Err(self.not_xml(error)),
            Ok(event) => self.on(event),
        };
        self.event = buffer;
        step
    }

    fn on(&mut self, event: Event<'_>) -> Result<Step, FileError> {
        match event {
            Event::Start(start) => self.open(&start, false),
            Event::Empty(start) => self.open(&start, true),
            Event::End(_) => self.close(),
            Event::Text(text) => self.text(&text.xml10_content()),
            Event::CData(data) => self.text(&data.xml10_content()),
            Event::GeneralRef(reference) => self.text(&resolve(&reference)),
            Event::Eof => Err(self.end_of_file()),
            // The declaration (already read by `utf8_input`), comments, PIs, DOCTYPE.
            _ => Ok(Step::Next),
        }
    }

    fn open(&mut self, start: &BytesStart<'_>, empty: bool) -> Result<Step, FileError> {
        let line = self.line().saturating_sub(newlines(start.as_bytes()));
        let name = start.local_name().as_ref().to_owned();
        if self.path.is_empty() {
            self.open_root(start, &name)?;
        } else if self.path.len() >= DEPTH_MAX {
            return Err(self.fatal(FileProblem::TooDeep { limit: DEPTH_MAX }));
        } else if let Some(kind) = self.starts_element(&name) {
            let node = Node::new(name.clone(), self.attributes(start)?);
            self.captures.push(Capture {
                kind,
                line,
                depth: self.path.len(),
                nodes: Vec::new(),
                bytes: 0,
                overflow: false,
            });
            self.add_node(node);
        } else if self
            .captures
            .last()
            .is_some_and(|capture| !capture.overflow)
        {
            let node = Node::new(name.clone(), self.attributes(start)?);
            self.add_node(node);
        } else if self.captures.is_empty() {
            self.open_section(start, &name)?;
        }
        self.path.push(Open { name, line });
        if empty {
            self.close()
        } else {
            Ok(Step::Next)
        }
    }

    /// The root: a `КоммерческаяИнформация`, with the header's attributes.
    fn open_root(&mut self, start: &BytesStart<'_>, name: &str) -> Result<(), FileError> {
        if name != ROOT {
            let root = name.to_owned();
            return Err(self.fatal(FileProblem::NotCommerceMl { root }));
        }
        for (key, value) in self.attribute_pairs(start)? {
            match key.as_str() {
                "ВерсияСхемы" => self.header.schema_version = Some(value),
                "ДатаФормирования" => self.header.formed = Some(value),
                _ => {}
            }
        }
        Ok(())
    }

    /// Outside every element of the table: `Каталог`/`ПакетПредложений`'s
    /// `СодержитТолькоИзменения`, an attribute or (older files) a child element.
    fn open_section(&mut self, start: &BytesStart<'_>, name: &str) -> Result<(), FileError> {
        if name == "СодержитТолькоИзменения" {
            if let [_, parent] = self.path.as_slice() {
                if let Some(section) = section_named(&parent.name) {
                    let text = String::new();
                    self.flag = Some(Flag { section, text });
                }
            }
            return Ok(());
        }
        let Some(section) = section_named(name).filter(|_| self.path.len() == 1) else {
            return Ok(());
        };
        for (key, value) in self.attribute_pairs(start)? {
            if key == "СодержитТолькоИзменения" {
                self.set_only_changes(section, &value);
            }
        }
        Ok(())
    }

    fn set_only_changes(&mut self, section: Section, value: &str) {
        let value = match value.trim() {
            v if v.eq_ignore_ascii_case("true") => Some(true),
            v if v.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        };
        match section {
            Section::Catalog => self.header.catalog_only_changes = value,
            Section::Offers => self.header.offers_only_changes = value,
        }
    }

    /// The element of the table `name` starts here, if it does.
    fn starts_element(&self, name: &str) -> Option<&'static str> {
        if let Some(capture) = self.captures.last() {
            // A nested group, directly in the `Группы` of the group being built.
            let nested = capture.kind == GROUP
                && name == "Группа"
                && capture.nodes.len() == 2
                && capture.nodes[1].name == "Группы";
            return nested.then_some(GROUP);
        }
        let below: Vec<&str> = self.path[1..].iter().map(|o| o.name.as_str()).collect();
        match (below.as_slice(), name) {
            (["Классификатор", "Группы"], "Группа") => Some(GROUP),
            (["Классификатор", "Свойства"], "Свойство") => {
                Some(PROPERTY)
            }
            (["Каталог", "Товары"], "Товар") => Some(PRODUCT),
            (["ПакетПредложений", "Предложения"], "Предложение") => {
                Some(OFFER)
            }
            (_, "Документ") => Some(DOCUMENT),
            _ => None,
        }
    }

    fn close(&mut self) -> Result<Step, FileError> {
        let Some(open) = self.path.pop() else {
            return Ok(Step::Next);
        };
        let depth = self.path.len();
        if depth == 0 {
            return Ok(Step::End);
        }
        if open.name == "СодержитТолькоИзменения" {
            if let Some(flag) = self.flag.take() {
                self.set_only_changes(flag.section, &flag.text);
            }
        }
        let Some(capture) = self.captures.last_mut() else {
            return Ok(Step::Next);
        };
        if capture.depth == depth {
            return match self.captures.pop() {
                Some(capture) => Ok(Step::Item(self.finish(capture))),
                None => Ok(Step::Next),
            };
        }
        if !capture.overflow {
            capture.close_node();
        }
        Ok(Step::Next)
    }

    fn text(&mut self, text: &str) -> Result<Step, FileError> {
        if self.path.is_empty() {
            if text.bytes().all(|byte| byte.is_ascii_whitespace()) {
                return Ok(Step::Next);
            }
            let start: String = text.chars().take(40).collect();
            let detail = format!("text where the root element should be: {start:?}");
            return Err(self.fatal(FileProblem::NotXml(detail)));
        }
        let taken = self.flag.is_some() || self.captures.last().is_some_and(|c| !c.overflow);
        if !taken {
            return Ok(Step::Next);
        }
        if let Some(flag) = &mut self.flag {
            if flag.text.len() < FLAG_BYTES {
                flag.text.push_str(text);
            }
            return Ok(Step::Next);
        }
        if let Some(node) = self.captures.last_mut().and_then(|c| c.nodes.last_mut()) {
            node.text.push_str(text);
        }
        self.grow(text.len());
        Ok(Step::Next)
    }

    fn end_of_file(&self) -> FileError {
        match self.path.last() {
            None => self.fatal(FileProblem::Empty),
            Some(open) => self.fatal(FileProblem::Truncated {
                open: open.name.clone(),
                opened: open.line,
            }),
        }
    }

    /// The element `capture` built, closed: its `Ид`, deletion mark and data.
    fn finish(&mut self, capture: Capture) -> Result<Element, ElementError> {
        let Capture {
            kind,
            line,
            nodes,
            overflow,
            ..
        } = capture;
        let error = |problem| ElementError {
            kind,
            line,
            problem,
        };
        let Some(root) = nodes.into_iter().next().filter(|_| !overflow) else {
            let limit = self.limit;
            return Err(error(ElementProblem::TooLarge { limit }));
        };
        let mut data = root.into_object();
        let reference = match data.get("Ид") {
            Some(Value::String(id)) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => return Err(error(ElementProblem::MissingId)),
        };
        if kind == GROUP {
            if let Some(parent) = self.parent_group() {
                data.entry("ИдРодителя").or_insert(Value::String(parent));
            }
        }
        Ok(Element {
            kind,
            reference,
            deleted: deleted(&data),
            data: Value::Object(data),
            line,
        })
    }

    /// The `Ид` of the group being built around the one just closed.
    fn parent_group(&self) -> Option<String> {
        let parent = self.captures.last().filter(|c| c.kind == GROUP)?;
        match parent.nodes.first()?.fields.get("Ид")? {
            Value::String(id) => Some(id.trim().to_owned()),
            _ => None,
        }
    }

    fn add_node(&mut self, node: Node) {
        let bytes = node.name.len()
            + node
                .fields
                .iter()
                .map(|(key, value)| key.len() + value.as_str().map_or(0, str::len))
                .sum::<usize>();
        if let Some(capture) = self.captures.last_mut() {
            capture.nodes.push(node);
        }
        self.grow(bytes);
    }

    /// `bytes` more held by the element being built.
    fn grow(&mut self, bytes: usize) {
        let Some(capture) = self.captures.last_mut() else {
            return;
        };
        capture.bytes += bytes;
        let held = self.captures.iter().map(|c| c.bytes).sum::<usize>();
        self.peak = self.peak.max(held);
        let limit = self.limit;
        if let Some(capture) = self.captures.last_mut().filter(|c| c.bytes > limit) {
            capture.overflow = true;
            capture.nodes = Vec::new();
            capture.bytes = 0;
        }
    }

    /// The element's attributes as `"@name"` fields.
    fn attributes(&self, start: &BytesStart<'_>) -> Result<Map<String, Value>, FileError> {
        Ok(self
            .attribute_pairs(start)?
            .into_iter()
            .map(|(key, value)| (format!("@{key}"), Value::String(value)))
            .collect())
    }

    /// The element's attributes (local names; `xmlns` declarations left out), unescaped.
    fn attribute_pairs(&self, start: &BytesStart<'_>) -> Result<Vec<(String, String)>, FileError> {
        let mut pairs = Vec::new();
        for attribute in start.attributes() {
            let attribute = attribute.map_err(|error| self.not_xml(error))?;
            let qualified = attribute.key.as_ref();
            if qualified == "xmlns" || qualified.starts_with("xmlns:") {
                continue;
            }
            let key = attribute.key.local_name().as_ref().to_owned();
            // Unescaped, tabs and line feeds as spaces (XML's attribute-value normalisation);
            // a reference XML does not define stays as written.
            let value = match attribute.normalized_value(XmlVersion::Implicit1_0) {
                Ok(value) => value.into_owned(),
                Err(_) => attribute.value.clone().into_owned(),
            };
            pairs.push((key, value));
        }
        Ok(pairs)
    }

    fn fatal(&self, problem: FileProblem) -> FileError {
        let line = self.line();
        FileError { line, problem }
    }

    fn not_xml(&self, error: impl std::fmt::Display) -> FileError {
        self.fatal(FileProblem::NotXml(error.to_string()))
    }
}

impl Iterator for Reader<'_> {
    type Item = Result<Element, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(error) = self.pending.take() {
            self.done = true;
            return Some(Err(error.into()));
        }
        loop {
            match self.step() {
                Ok(Step::Next) => {}
                Ok(Step::Item(item)) => return Some(item.map_err(ReadError::from)),
                Ok(Step::End) => break,
                Err(error) => {
                    self.done = true;
                    self.captures.clear();
                    return Some(Err(error.into()));
                }
            }
        }
        self.done = true;
        None
    }
}

impl std::iter::FusedIterator for Reader<'_> {}

impl Capture {
    /// The innermost open node closed: into its parent's fields. A group's own `Группы` is
    /// left out (its groups are elements of their own).
    fn close_node(&mut self) {
        let Some(mut node) = self.nodes.pop() else {
            return;
        };
        if self.kind == GROUP && self.nodes.len() == 1 && node.name == "Группы" {
            return;
        }
        if let Some(parent) = self.nodes.last_mut() {
            let name = std::mem::take(&mut node.name);
            add_field(&mut parent.fields, name, node.into_value());
            parent.children = true;
        }
    }
}

impl Node {
    fn new(name: String, fields: Map<String, Value>) -> Self {
        let text = String::new();
        Node {
            name,
            fields,
            text,
            children: false,
        }
    }

    /// A text-only element is its text, exactly; any other an object.
    fn into_value(self) -> Value {
        if self.fields.is_empty() {
            Value::String(self.text)
        } else {
            Value::Object(self.into_object())
        }
    }

    /// The fields, with `"#text"` unless the text is only whitespace (trimmed when the
    /// element has children: that text is the indentation around them and what is between).
    fn into_object(self) -> Map<String, Value> {
        let mut fields = self.fields;
        if !self.text.trim().is_empty() {
            let text = if self.children {
                self.text.trim().to_owned()
            } else {
                self.text
            };
            fields.insert("#text".to_owned(), Value::String(text));
        }
        fields
    }
}

/// A child into its parent's fields: the first as itself, a repeated one makes an array.
fn add_field(fields: &mut Map<String, Value>, name: String, value: Value) {
    match fields.get_mut(&name) {
        None => {
            fields.insert(name, value);
        }
        Some(Value::Array(items)) => items.push(value),
        Some(first) => {
            let previous = first.take();
            *first = Value::Array(vec![previous, value]);
        }
    }
}

/// Marked deleted: `@Статус` or `Статус` = `Удален`, `ПометкаУдаления` = `true`, or a
/// requisite `ПометкаУдаления` = `true`.
fn deleted(data: &Map<String, Value>) -> bool {
    let is = |key: &str, wanted: &str| {
        data.get(key)
            .and_then(text_of)
            .is_some_and(|text| text.eq_ignore_ascii_case(wanted))
    };
    if is("@Статус", "Удален") || is("Статус", "Удален") || is("ПометкаУдаления", "true")
    {
        return true;
    }
    let Some(rows) = data
        .get("ЗначенияРеквизитов")
        .and_then(|requisites| requisites.get("ЗначениеРеквизита"))
    else {
        return false;
    };
    let rows = match rows {
        Value::Array(rows) => rows.as_slice(),
        row => std::slice::from_ref(row),
    };
    rows.iter().any(|row| {
        row.get("Наименование").and_then(text_of) == Some("ПометкаУдаления")
            && row
                .get("Значение")
                .and_then(text_of)
                .is_some_and(|value| value.eq_ignore_ascii_case("true"))
    })
}

/// The text of a field: a string, or an object's `"#text"`; trimmed.
fn text_of(value: &Value) -> Option<&str> {
    match value {
        Value::String(text) => Some(text.trim()),
        Value::Object(fields) => fields.get("#text").and_then(Value::as_str).map(str::trim),
        _ => None,
    }
}

fn section_named(name: &str) -> Option<Section> {
    match name {
        "Каталог" => Some(Section::Catalog),
        "ПакетПредложений" => Some(Section::Offers),
        _ => None,
    }
}

/// A character or entity reference as text; one XML does not define stays as written.
fn resolve(reference: &BytesRef<'_>) -> String {
    if let Ok(Some(character)) = reference.resolve_char_ref() {
        return character.to_string();
    }
    let name: &str = reference;
    match quick_xml::escape::resolve_predefined_entity(name) {
        Some(text) => text.to_owned(),
        None => format!("&{name};"),
    }
}

fn newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&byte| byte == b'\n').count() as u64
}

/// The input, ready for quick-xml: UTF-8, without a BOM.
fn utf8_input<'r, R: BufRead + Send + 'r>(mut input: R) -> Result<Source<'r>, FileError> {
    let mut prefix = Vec::new();
    if let Err(error) = (&mut input).take(PREFIX_BYTES).read_to_end(&mut prefix) {
        let problem = FileProblem::Io(error.to_string());
        return Err(FileError { line: 1, problem });
    }
    let (encoding, bom) = match Encoding::for_bom(&prefix) {
        Some((encoding, bom)) => (encoding, bom),
        None => (declared_encoding(&prefix)?, 0),
    };
    let mut start = io::Cursor::new(prefix);
    if encoding == UTF_8 {
        start.set_position(bom as u64);
        return Ok(Box::new(start.chain(input)));
    }
    // The decoder takes the BOM of its encoding off itself.
    let decoder = encoding.new_decoder();
    Ok(Box::new(Transcode::new(
        Box::new(start.chain(input)),
        decoder,
    )))
}

/// The encoding the XML declaration at the start of `prefix` names; UTF-8 without one.
fn declared_encoding(prefix: &[u8]) -> Result<&'static Encoding, FileError> {
    let Some(label) = declared_label(prefix) else {
        return Ok(UTF_8);
    };
    match Encoding::for_label(label) {
        // A declaration readable as ASCII is not in UTF-16, whatever it says.
        Some(encoding) if encoding == UTF_16LE || encoding == UTF_16BE => Ok(UTF_8),
        Some(encoding) => Ok(encoding),
        None => {
            let label = String::from_utf8_lossy(label).into_owned();
            let problem = FileProblem::UnknownEncoding(label);
            Err(FileError { line: 1, problem })
        }
    }
}

/// `windows-1251` of `<?xml version="1.0" encoding="windows-1251"?>`.
fn declared_label(prefix: &[u8]) -> Option<&[u8]> {
    let declaration = prefix.strip_prefix(b"<?xml")?;
    let declaration = &declaration[..find(declaration, b"?>")?];
    let at = find(declaration, b"encoding")?;
    let rest = declaration[at + b"encoding".len()..].trim_ascii_start();
    let rest = rest.strip_prefix(b"=")?.trim_ascii_start();
    let (&quote, value) = rest.split_first()?;
    if quote != b'"' && quote != b'\'' {
        return None;
    }
    let end = value.iter().position(|&byte| byte == quote)?;
    Some(&value[..end])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn read_some(source: &mut Source<'_>, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        match source.read(buffer) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

/// A stream in another encoding, as UTF-8 (malformed bytes become U+FFFD).
struct Transcode<'r> {
    source: Source<'r>,
    decoder: Decoder,
    input: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    finished: bool,
}

impl<'r> Transcode<'r> {
    fn new(source: Source<'r>, decoder: Decoder) -> Self {
        Transcode {
            source,
            decoder,
            input: vec![0; BUFFER_BYTES],
            start: 0,
            end: 0,
            eof: false,
            finished: false,
        }
    }
}

impl Read for Transcode<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.finished || out.is_empty() {
                return Ok(0);
            }
            if self.start == self.end && !self.eof {
                self.start = 0;
                self.end = read_some(&mut self.source, &mut self.input)?;
                self.eof = self.end == 0;
            }
            let input = &self.input[self.start..self.end];
            let (result, read, written, _) = self.decoder.decode_to_utf8(input, out, self.eof);
            self.start += read;
            if self.eof && result == CoderResult::InputEmpty {
                self.finished = true;
            }
            if written > 0 {
                return Ok(written);
            }
            if result == CoderResult::OutputFull {
                return Err(io::Error::other("no room to transcode one character into"));
            }
        }
    }
}

/// The read buffer quick-xml reads through, counting the line feeds it consumed.
struct Lines<'r> {
    source: Source<'r>,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    newlines: u64,
}

impl<'r> Lines<'r> {
    fn new(source: Source<'r>) -> Self {
        Lines {
            source,
            buffer: vec![0; BUFFER_BYTES],
            start: 0,
            end: 0,
            newlines: 0,
        }
    }
}

impl Read for Lines<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Lines<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end {
            self.start = 0;
            self.end = read_some(&mut self.source, &mut self.buffer)?;
        }
        Ok(&self.buffer[self.start..self.end])
    }

    fn consume(&mut self, amount: usize) {
        let end = (self.start + amount).min(self.end);
        self.newlines += newlines(&self.buffer[self.start..end]);
        self.start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commerceml::element_name;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/commerceml/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Every item of `bytes` read, split into the elements and the errors, and the header.
    fn read(bytes: &[u8]) -> (Vec<Element>, Vec<ReadError>, Header) {
        let mut reader = Reader::new(bytes);
        let mut elements = Vec::new();
        let mut errors = Vec::new();
        for item in &mut reader {
            match item {
                Ok(element) => elements.push(element),
                Err(error) => errors.push(error),
            }
        }
        (elements, errors, reader.header().clone())
    }

    fn counts(elements: &[Element]) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for element in elements {
            *counts.entry(element.kind).or_insert(0) += 1;
        }
        counts
    }

    fn by_ref<'a>(elements: &'a [Element], reference: &str) -> &'a Element {
        elements
            .iter()
            .find(|e| e.reference == reference)
            .unwrap_or_else(|| panic!("no element {reference}"))
    }

    fn catalog(products: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<КоммерческаяИнформация \
             ВерсияСхемы=\"2.10\">\n<Каталог СодержитТолькоИзменения=\"true\">\n<Товары>\n\
             {products}</Товары>\n</Каталог>\n</КоммерческаяИнформация>\n"
        )
    }

    fn file_error(error: &ReadError) -> &FileError {
        match error {
            ReadError::File(error) => error,
            other => panic!("not a file error: {other}"),
        }
    }

    #[test]
    fn import_file_gives_its_group_properties_and_products() {
        let (elements, errors, header) = read(&fixture("import0_1.xml"));
        assert!(errors.is_empty(), "{errors:?}");
        let expected = BTreeMap::from([(GROUP, 1), (PROPERTY, 12), (PRODUCT, 36)]);
        assert_eq!(counts(&elements), expected);
        assert_eq!(header.schema_version.as_deref(), Some("2.07"));
        assert_eq!(header.formed.as_deref(), Some("2020-04-07T13:16:06"));
        assert_eq!(header.catalog_only_changes, Some(false));
        assert_eq!(header.offers_only_changes, None);
        let group = by_ref(&elements, "82cfb8dc-18f9-11e7-80c2-0cc47ab29cd1");
        let expected = json!({"Ид": "82cfb8dc-18f9-11e7-80c2-0cc47ab29cd1",
                              "Наименование": "Коврики для дома"});
        assert_eq!(
            (group.kind, &group.data, group.line),
            (GROUP, &expected, 15)
        );
        // The one product marked `Статус="Удален"` in the file, and only that one.
        let deleted: Vec<&str> = elements
            .iter()
            .filter(|e| e.deleted)
            .map(|e| e.reference.as_str())
            .collect();
        assert_eq!(deleted, ["b631c9c1-49de-11e9-80c9-0cc47ab29cd1"]);
        let gone = by_ref(&elements, "b631c9c1-49de-11e9-80c9-0cc47ab29cd1");
        assert_eq!(
            (gone.data["@Статус"].as_str(), gone.line),
            (Some("Удален"), 2701)
        );
        let property = by_ref(&elements, "3268183f-18fa-11e7-80c2-0cc47ab29cd1");
        let expected = json!({
            "Ид": "3268183f-18fa-11e7-80c2-0cc47ab29cd1",
            "Наименование": "Страна производства",
            "ТипЗначений": "Справочник",
            "ВариантыЗначений": {"Справочник": {
                "ИдЗначения": "af848a7e-18fa-11e7-80c2-0cc47ab29cd1",
                "Значение": "КОРЕЯ, РЕСПУБЛИКА"}}
        });
        assert_eq!((property.kind, &property.data), (PROPERTY, &expected));
    }

    #[test]
    fn a_product_is_its_element_as_json() {
        let (elements, _, _) = read(&fixture("import0_1.xml"));
        let product = &elements.iter().find(|e| e.kind == PRODUCT).unwrap();
        let values = [
            ("8d11c16f-1d64-11e9-80c9-0cc47ab29cd1", "149831179"),
            ("38409b0c-29da-11e9-80c9-0cc47ab29cd1", "1,4"),
            (
                "3268183f-18fa-11e7-80c2-0cc47ab29cd1",
                "af848a7e-18fa-11e7-80c2-0cc47ab29cd1",
            ),
            (
                "06375b96-18fb-11e7-80c2-0cc47ab29cd1",
                "259d77bb-18fb-11e7-80c2-0cc47ab29cd1",
            ),
            ("170b53b1-23ca-11e9-80c9-0cc47ab29cd1", "2"),
            ("59125bb0-2483-11e9-80c9-0cc47ab29cd1", "1,4"),
            ("79a0056f-2483-11e9-80c9-0cc47ab29cd1", "0,01"),
            ("a3e9701f-2483-11e9-80c9-0cc47ab29cd1", "Деревянные лошадки"),
            (
                "366a7fb2-2484-11e9-80c9-0cc47ab29cd1",
                "46b9ad0c-2484-11e9-80c9-0cc47ab29cd1",
            ),
            ("0ce59660-260b-11e9-80c9-0cc47ab29cd1", "0,71"),
            ("729246b8-260b-11e9-80c9-0cc47ab29cd1", "0,4"),
            ("8cb50d27-260b-11e9-80c9-0cc47ab29cd1", "0,12"),
        ];
        let values: Vec<Value> = values
            .iter()
            .map(|(id, value)| json!({"Ид": id, "Значение": value}))
            .collect();
        let name = "Портативный коврик Portable 140x200x1 см, Деревянные лошадки";
        let expected = json!({
            "Ид": "bd8c4e15-18f9-11e7-80c2-0cc47ab29cd1",
            "Штрихкод": "8809288404089",
            "Артикул": "PM-421-WP",
            "Наименование": name,
            "БазоваяЕдиница": {
                "@Код": "796 ", "@НаименованиеПолное": "Штука", "@МеждународноеСокращение": "PCE",
                "Пересчет": {"Единица": "796", "Коэффициент": "1"}
            },
            "Группы": {"Ид": "82cfb8dc-18f9-11e7-80c2-0cc47ab29cd1"},
            "Описание": "",
            "Изготовитель": {"Ид": "018b11b8-18fa-11e7-80c2-0cc47ab29cd1", "Наименование": "Crazy Boom"},
            "ЗначенияСвойств": {"ЗначенияСвойства": values},
            "СтавкиНалогов": {"СтавкаНалога": {"Наименование": "НДС", "Ставка": "20"}},
            "ЗначенияРеквизитов": {"ЗначениеРеквизита": [
                {"Наименование": "ВидНоменклатуры", "Значение": "Коврики для дома"},
                {"Наименование": "ТипНоменклатуры", "Значение": "Товар"},
                {"Наименование": "Полное наименование", "Значение": name}
            ]}
        });
        assert_eq!(product.data, expected);
        assert_eq!(product.reference, "bd8c4e15-18f9-11e7-80c2-0cc47ab29cd1");
        assert_eq!((product.line, product.deleted), (150, false));
    }

    #[test]
    fn nested_groups_are_each_an_element_with_their_parent() {
        let (elements, errors, header) = read(&fixture("import0_1_with_nested_groups.xml"));
        assert!(errors.is_empty(), "{errors:?}");
        let expected = BTreeMap::from([(GROUP, 13), (PROPERTY, 20), (PRODUCT, 283)]);
        assert_eq!(counts(&elements), expected);
        assert_eq!(header.catalog_only_changes, Some(false));
        let groups: Vec<&Element> = elements.iter().filter(|e| e.kind == GROUP).collect();
        let parent_of = |element: &Element| element.data.get("ИдРодителя").cloned();
        let children = "94878333-8068-11ea-80c9-0cc47ab29cd1";
        let other = "00ff5a33-38de-11eb-80cc-0cc47ab29cd1";
        let mut under: BTreeMap<Option<String>, Vec<&str>> = BTreeMap::new();
        for group in &groups {
            let parent = parent_of(group).map(|p| p.as_str().unwrap().to_owned());
            under
                .entry(parent)
                .or_default()
                .push(group.reference.as_str());
            assert!(group.data["Наименование"].is_string(), "{group:?}");
            assert!(group.data.get("Группы").is_none(), "{group:?}");
        }
        assert_eq!(under[&None], [children, other]);
        assert_eq!(under[&Some(children.to_owned())].len(), 10);
        assert_eq!(
            under[&Some(other.to_owned())],
            ["50b5ab61-38de-11eb-80cc-0cc47ab29cd1"]
        );
        let top = by_ref(&elements, children);
        let expected = json!({"Ид": children, "Наименование": "Детские товары"});
        assert_eq!((&top.data, top.line), (&expected, 15));
        let child = by_ref(&elements, "8cb41cd6-1f2b-11e7-80c2-0cc47ab29cd1");
        let expected = json!({"Ид": "8cb41cd6-1f2b-11e7-80c2-0cc47ab29cd1",
                              "Наименование": "Детские манежи", "ИдРодителя": children});
        assert_eq!((&child.data, child.line), (&expected, 23));
        // A group comes when it closes: its children first.
        let position = |reference: &str| groups.iter().position(|g| g.reference == reference);
        assert!(position(child.reference.as_str()) < position(children));
    }

    #[test]
    fn an_offer_is_its_element_as_json() {
        let (elements, errors, header) = read(&fixture("offers0_1.xml"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(counts(&elements), BTreeMap::from([(OFFER, 44)]));
        assert_eq!(header.schema_version.as_deref(), Some("2.07"));
        assert_eq!(header.offers_only_changes, Some(false));
        assert_eq!(header.catalog_only_changes, None);
        let offer = &elements[0];
        let warehouse =
            |id: &str, quantity: &str| json!({"@ИдСклада": id, "@КоличествоНаСкладе": quantity});
        let expected = json!({
            "Ид": "bd8c4e15-18f9-11e7-80c2-0cc47ab29cd1",
            "Артикул": "PM-421-WP",
            "Наименование": "Портативный коврик Portable 140x200x1 см, Деревянные лошадки",
            "БазоваяЕдиница": {
                "@Код": "796 ", "@НаименованиеПолное": "Штука", "@МеждународноеСокращение": "PCE",
                "Пересчет": {"Единица": "796", "Коэффициент": "1"}
            },
            "Цены": {"Цена": {
                "Представление": " 100 RUB за PCE",
                "ИдТипаЦены": "279b6812-740b-11e8-80c8-0cc47ab29cd1",
                "ЦенаЗаЕдиницу": "100", "Валюта": "RUB", "Единица": "PCE", "Коэффициент": "1"
            }},
            "Количество": "377",
            "Склад": [
                warehouse("6abdb0b5-18fd-11e7-80c2-0cc47ab29cd1", "1"),
                warehouse("d2a52d49-19c9-11e7-80c2-0cc47ab29cd1", "0"),
                warehouse("dd306af1-19c9-11e7-80c2-0cc47ab29cd1", "376"),
            ]
        });
        assert_eq!(offer.data, expected);
        assert_eq!((offer.kind, offer.line, offer.deleted), (OFFER, 55, false));
        assert_eq!(offer.reference, "bd8c4e15-18f9-11e7-80c2-0cc47ab29cd1");
    }

    #[test]
    fn windows_1251_orders_are_documents_in_cyrillic() {
        let bytes = fixture("bitrix-query-response-full.xml");
        assert!(
            std::str::from_utf8(&bytes).is_err(),
            "the fixture is not windows-1251"
        );
        let (elements, errors, header) = read(&bytes);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(header.schema_version.as_deref(), Some("2.05"));
        let refs: Vec<(&str, &str, u64)> = elements
            .iter()
            .map(|e| (e.kind, e.reference.as_str(), e.line))
            .collect();
        assert_eq!(refs, [(DOCUMENT, "132", 5), (DOCUMENT, "133", 115)]);
        let first = &elements[0].data;
        assert_eq!(first["ХозОперация"], "Заказ товара");
        assert_eq!(first["Контрагенты"]["Контрагент"]["Роль"], "Покупатель");
        assert_eq!(first["Комментарий"], "");
        let unit = json!({"@Код": "796", "@НаименованиеПолное": "Штука",
                          "@МеждународноеСокращение": "PCE", "#text": "шт"});
        assert_eq!(first["Товары"]["Товар"]["БазоваяЕдиница"], unit);
        let requisites = first["ЗначенияРеквизитов"]["ЗначениеРеквизита"]
            .as_array()
            .unwrap();
        let status = json!({"Наименование": "Статус заказа",
                            "Значение": "[N] Принят, ожидается оплата"});
        assert!(requisites.contains(&status), "{requisites:?}");
        let second = &elements[1].data;
        assert_eq!(second["Товары"]["Товар"].as_array().unwrap().len(), 7);
        let customer = "5#content-manager# Контент менджер";
        assert_eq!(second["Контрагенты"]["Контрагент"]["Ид"], customer);
        assert!(elements.iter().all(|e| !e.deleted));

        let (elements, errors, header) = read(&fixture("bitrix-query-response-empty.xml"));
        assert_eq!((elements.len(), errors.len()), (0, 0));
        assert_eq!(header.formed.as_deref(), Some("2021-02-12T17:04:36"));
    }

    #[test]
    fn utf8_with_or_without_a_bom_and_utf16_read_alike() {
        let text =
            catalog("<Товар><Ид>a</Ид><Наименование>Ёлка &amp; шар</Наименование></Товар>\n");
        let plain = read(text.as_bytes());
        assert_eq!(plain.0.len(), 1, "{:?}", plain.1);
        assert_eq!(plain.0[0].data["Наименование"], "Ёлка & шар");
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(text.as_bytes());
        assert_eq!(read(&bom), plain);
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(read(&utf16), plain);
        // Declared windows-1251 and so encoded.
        let declared = text.replace("UTF-8", "windows-1251");
        let (bytes, _, _) = encoding_rs::WINDOWS_1251.encode(&declared);
        assert_eq!(read(&bytes), plain);
    }

    #[test]
    fn a_truncated_file_is_fatal_with_its_line_after_what_was_whole() {
        let text = String::from_utf8(fixture("import0_1.xml")).unwrap();
        let cut = text.lines().take(300).collect::<Vec<_>>().join("\n");
        assert!(
            cut.ends_with("\t<ЗначенияСвойства>"),
            "{:?}",
            cut.lines().last()
        );
        let (elements, errors, _) = read(cut.as_bytes());
        let expected = BTreeMap::from([(GROUP, 1), (PROPERTY, 12), (PRODUCT, 1)]);
        assert_eq!(counts(&elements), expected);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let error = file_error(&errors[0]);
        assert_eq!(error.line, 300);
        let open = "ЗначенияСвойства".to_owned();
        assert_eq!(error.problem, FileProblem::Truncated { open, opened: 300 });
        assert!(
            errors[0].russian().contains("строке 300"),
            "{}",
            errors[0].russian()
        );
        // Cut inside a tag: not XML any more, on the line where it stops.
        let cut = &text[..text.find("<Артикул>PM-421-LE").unwrap() + "<Ар".len()];
        let (elements, errors, _) = read(cut.as_bytes());
        assert_eq!(elements.iter().filter(|e| e.kind == PRODUCT).count(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(file_error(&errors[0]).line, cut.lines().count() as u64);
    }

    /// Whether a file error's problem is the expected one.
    type Expected = fn(&FileProblem) -> bool;

    #[test]
    fn a_body_that_is_not_commerceml_is_one_fatal_error() {
        let cases: [(&[u8], Expected); 6] = [
            (b"", |p| *p == FileProblem::Empty),
            (b"  \n", |p| *p == FileProblem::Empty),
            (b"hello, this is not XML", |p| {
                matches!(p, FileProblem::NotXml(_))
            }),
            (b"{\"json\": true}", |p| matches!(p, FileProblem::NotXml(_))),
            (b"PK\x03\x04\x14\x00\x08\x08\x00\x00\xff\xfe", |p| {
                matches!(p, FileProblem::NotXml(_))
            }),
            (b"<html><body>502 Bad Gateway</body></html>", |p| {
                *p == FileProblem::NotCommerceMl {
                    root: "html".into(),
                }
            }),
        ];
        for (body, expected) in cases {
            let (elements, errors, _) = read(body);
            assert!(elements.is_empty());
            assert_eq!(errors.len(), 1, "{body:?}: {errors:?}");
            let error = file_error(&errors[0]);
            assert!(expected(&error.problem), "{body:?}: {error}");
            assert_eq!(error.line, 1 + newlines(body).min(1), "{body:?}");
        }
        // windows-1251 bytes in a file that says (by saying nothing) it is UTF-8.
        let text = catalog("<Товар><Ид>1</Ид></Товар>\n");
        let (bytes, _, _) = encoding_rs::WINDOWS_1251.encode(&text);
        let (_, errors, _) = read(&bytes);
        let error = file_error(&errors[0]);
        assert!(
            matches!(&error.problem, FileProblem::NotXml(detail) if detail.contains("encoding"))
        );
        assert_eq!((errors.len(), error.line), (1, 2), "{errors:?}");
        let unknown = b"<?xml version=\"1.0\" encoding=\"koi9\"?><root/>";
        let (_, errors, _) = read(unknown);
        let problem = FileProblem::UnknownEncoding("koi9".into());
        assert_eq!(file_error(&errors[0]).problem, problem);
        let deep = format!("<{ROOT}>{}", "<a>".repeat(DEPTH_MAX + 1));
        let (_, errors, _) = read(deep.as_bytes());
        let problem = FileProblem::TooDeep { limit: DEPTH_MAX };
        assert_eq!(file_error(&errors[0]).problem, problem);
    }

    #[test]
    fn an_element_without_id_is_its_own_error_and_the_others_are_read() {
        let text = catalog(
            "<Товар><Ид>1</Ид></Товар>\n<Товар>\n<Наименование>без Ид</Наименование>\n</Товар>\n\
             <Товар><Ид> </Ид></Товар>\n<Товар><Ид>4</Ид></Товар>\n",
        );
        let items: Vec<Result<Element, ReadError>> = Reader::new(text.as_bytes()).collect();
        assert_eq!(items.len(), 4, "{items:?}");
        assert_eq!(items[0].as_ref().unwrap().reference, "1");
        assert_eq!(items[3].as_ref().unwrap().reference, "4");
        for (item, line) in [(&items[1], 6), (&items[2], 9)] {
            let error = ElementError {
                kind: PRODUCT,
                line,
                problem: ElementProblem::MissingId,
            };
            assert_eq!(
                item.as_ref().unwrap_err(),
                &ReadError::Element(error.clone())
            );
            assert!(error.to_string().contains("<Товар>"), "{error}");
            let russian = error.russian();
            assert!(russian.contains(&format!("строка {line}")), "{russian}");
        }
        assert_eq!(element_name(PRODUCT), "Товар");
    }

    #[test]
    fn deletion_marks_make_deleted_elements() {
        let text = format!(
            "<{ROOT}>\n<Каталог><Товары>\n\
             <Товар Статус=\"Удален\"><Ид>attribute</Ид></Товар>\n\
             <Товар><Ид>status</Ид><Статус>Удален</Статус></Товар>\n\
             <Товар><Ид>mark</Ид><ПометкаУдаления>true</ПометкаУдаления></Товар>\n\
             <Товар><Ид>kept</Ид><ПометкаУдаления>false</ПометкаУдаления>\
             <Статус>Изменен</Статус></Товар>\n\
             </Товары></Каталог>\n<Документ><Ид>order</Ид><ЗначенияРеквизитов>\
             <ЗначениеРеквизита><Наименование>Проведен</Наименование><Значение>false</Значение>\
             </ЗначениеРеквизита><ЗначениеРеквизита><Наименование>ПометкаУдаления</Наименование>\
             <Значение>true</Значение></ЗначениеРеквизита></ЗначенияРеквизитов></Документ>\n\
             <Документ><Ид>order-kept</Ид></Документ>\n</{ROOT}>"
        );
        let (elements, errors, _) = read(text.as_bytes());
        assert!(errors.is_empty(), "{errors:?}");
        let marks: Vec<(&str, bool)> = elements
            .iter()
            .map(|e| (e.reference.as_str(), e.deleted))
            .collect();
        let expected = [
            ("attribute", true),
            ("status", true),
            ("mark", true),
            ("kept", false),
            ("order", true),
            ("order-kept", false),
        ];
        assert_eq!(marks, expected);
    }

    #[test]
    fn xml_becomes_json_by_the_rule() {
        let text = format!(
            "<{ROOT} xmlns=\"urn:1C.ru:commerceml_2\">\n<Контейнер><Документ xmlns:x=\"urn:x\" \
             x:Вид=\"заказ\">\n<Ид>d1</Ид><Сумма Валюта=\"RUB\">10.50</Сумма><Строка/>\
             <Строка>два</Строка><Строка>три</Строка><Текст><![CDATA[<b>жирный</b>]]> &#1046;&lt;</Текст>\
             <Пусто a=\"1\"> </Пусто><Строки>а\r\nб\rв</Строки><Смесь>до <b>жирный</b> после</Смесь>\
             <ПодчиненныеДокументы><Документ><Ид>inner</Ид></Документ></ПодчиненныеДокументы>\
             </Документ></Контейнер>\n</{ROOT}>"
        );
        let (elements, errors, _) = read(text.as_bytes());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            elements.len(),
            1,
            "the inner Документ is the outer one's data"
        );
        let expected = json!({
            "@Вид": "заказ",
            "Ид": "d1",
            "Сумма": {"@Валюта": "RUB", "#text": "10.50"},
            "Строка": ["", "два", "три"],
            "Текст": "<b>жирный</b> Ж<",
            "Пусто": {"@a": "1"},
            "Строки": "а\nб\nв",
            "Смесь": {"b": "жирный", "#text": "до  после"},
            "ПодчиненныеДокументы": {"Документ": {"Ид": "inner"}}
        });
        assert_eq!(elements[0].data, expected);
        assert_eq!((elements[0].kind, elements[0].line), (DOCUMENT, 2));
    }

    #[test]
    fn only_changes_may_be_a_child_element_and_anything_after_the_root_is_not_read() {
        let text = format!(
            "<{ROOT}><ПакетПредложений><СодержитТолькоИзменения>true</СодержитТолькоИзменения>\
             <Предложения><Предложение><Ид>p#o</Ид></Предложение></Предложения>\
             </ПакетПредложений></{ROOT}>\n<garbage"
        );
        let (elements, errors, header) = read(text.as_bytes());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(header.offers_only_changes, Some(true));
        assert_eq!(elements[0].reference, "p#o");
        let (_, _, header) = read(catalog("").as_bytes());
        assert_eq!(header.catalog_only_changes, Some(true));
        assert_eq!(header.schema_version.as_deref(), Some("2.10"));
    }

    #[test]
    fn an_element_over_the_limit_is_its_own_error_and_the_others_are_read() {
        let long = "x".repeat(500);
        let text = catalog(&format!(
            "<Товар><Ид>1</Ид></Товар>\n<Товар><Ид>2</Ид><Описание>{long}</Описание></Товар>\n\
             <Товар><Ид>3</Ид></Товар>\n"
        ));
        let mut reader = Reader::new(text.as_bytes()).with_element_limit(200);
        let items: Vec<_> = (&mut reader).collect();
        assert_eq!(items.len(), 3, "{items:?}");
        let error = ElementError {
            kind: PRODUCT,
            line: 6,
            problem: ElementProblem::TooLarge { limit: 200 },
        };
        assert_eq!(items[1], Err(ReadError::Element(error)));
        assert_eq!(items[2].as_ref().unwrap().reference, "3");
        assert!(
            reader.peak_element_bytes() <= 200 + 500,
            "{}",
            reader.peak_element_bytes()
        );
    }

    /// A catalog of `products` products made as it is read, never whole in memory.
    struct Generated {
        products: usize,
        next: usize,
        chunk: Vec<u8>,
        at: usize,
    }

    impl Read for Generated {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.at == self.chunk.len() {
                self.chunk.clear();
                self.at = 0;
                let i = self.next;
                self.next += 1;
                let chunk = match i {
                    0 => catalog("").split("</Товары>").next().unwrap().to_owned(),
                    i if i <= self.products => format!(
                        "<Товар><Ид>{i:08}-0000-0000-0000-000000000000</Ид>\
                         <Наименование>Товар номер {i}</Наименование><Группы><Ид>g</Ид></Группы>\
                         <Описание>Описание товара {i}, довольно длинное для проверки</Описание>\
                         </Товар>\n"
                    ),
                    i if i == self.products + 1 => {
                        "</Товары></Каталог></КоммерческаяИнформация>\n".into()
                    }
                    _ => String::new(),
                };
                self.chunk.extend_from_slice(chunk.as_bytes());
            }
            let n = (self.chunk.len() - self.at).min(out.len());
            out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn a_catalog_of_100000_products_streams_holding_one_product() {
        let products = 100_000;
        let source = Generated {
            products,
            next: 0,
            chunk: Vec::new(),
            at: 0,
        };
        let mut reader = Reader::new(io::BufReader::new(source));
        let mut count = 0;
        let mut last = String::new();
        for item in &mut reader {
            let element = item.unwrap();
            count += 1;
            last = element.reference;
        }
        assert_eq!(count, products);
        assert_eq!(last, "00100000-0000-0000-0000-000000000000");
        // One product holds about 250 bytes: the reader never held two, let alone the file
        // (over 20 MB).
        assert!(
            reader.peak_element_bytes() < 400,
            "{}",
            reader.peak_element_bytes()
        );
        assert_eq!(reader.line(), products as u64 + 5);
    }
}
