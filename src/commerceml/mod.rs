//! CommerceML 2: the files 1C's built-in site exchange ("Обмен с сайтом") uploads, read as one
//! value per element of docs/api.md's table, pure (no I/O but the reader it is given, nothing
//! of ingress, deliver, broker, store, admin, embedded, app, cli).
//!
//! [`Reader`] streams a file (`read`): it never holds the document, only the element being
//! built, and yields each element as an [`Element`] (or a [`ReadError`]), one at a time:
//!
//! | element | [`Element::kind`] | [`Element::reference`] |
//! |---|---|---|
//! | `Классификатор/Группы//Группа` | [`GROUP`] `CommerceML.Группа` | its `Ид` |
//! | `Классификатор/Свойства/Свойство` | [`PROPERTY`] `CommerceML.Свойство` | its `Ид` |
//! | `Каталог/Товары/Товар` | [`PRODUCT`] `CommerceML.Товар` | its `Ид` |
//! | `ПакетПредложений/Предложения/Предложение` | [`OFFER`] `CommerceML.Предложение` | its `Ид` (`product#offer`) |
//! | `Документ`, at any depth outside those | [`DOCUMENT`] `CommerceML.Документ` | its `Ид` |
//!
//! The paths start below the root `КоммерческаяИнформация`; a `Документ` inside one of these
//! elements (a `ПодчиненныйДокумент` of an order, say) is part of that element's data.
//!
//! `data` is the element as JSON (docs/api.md): each child element a key, repeated children an
//! array (so one `Группы/Ид` is a string, two are an array), attributes under `"@name"`, the
//! text of an element with attributes or children under `"#text"` (left out when it is only
//! whitespace; trimmed when there are children), a text-only element a string, exactly as in
//! the file (`"Представление": " 100 RUB за PCE"`), an empty one `""`. Entity and character
//! references are resolved, CDATA is text, comments and processing instructions are skipped,
//! namespace prefixes are dropped from names (`xmlns` attributes too).
//!
//! Nested groups: every `Группа` at every level is an element of its own. A group's data
//! leaves out its nested `Группы` (the children come as their own elements) and, below the
//! top level, carries `"ИдРодителя"`: the parent group's `Ид` (when the file does not have
//! that key itself). A group is yielded when it closes, so children come before their
//! parent; the parent's own fields are kept while its children are read (so the elements
//! being built are one, or one per level of group nesting).
//!
//! Deleted ([`Element::deleted`], `op = "delete"`): the element's attribute `Статус="Удален"`
//! (CommerceML 2.10, and `Товар` in the real import0_1.xml), a child `Статус` = `Удален`, a
//! child `ПометкаУдаления` = `true`, or a requisite (`ЗначенияРеквизитов/ЗначениеРеквизита`)
//! named `ПометкаУдаления` with the value `true` (how 1C marks an order document for deletion).
//!
//! Errors: an element that can't be read (no `Ид`, or larger than the element limit) is a
//! [`ReadError::Element`] naming the element and its line, and the reader goes on with the
//! next; a file that can't be read on (not XML, truncated, not a `КоммерческаяИнформация`,
//! an unknown encoding) is one [`ReadError::File`] naming the line, and nothing follows it.
//! Each error says what is wrong in English (`Display`, for lxbridge's log) and in Russian
//! ([`ReadError::russian`], for the 1C user reading the exchange log).
//!
//! Encodings: by the byte-order mark (UTF-8, UTF-16), else by the XML declaration's
//! `encoding` (UTF-8 when there is none); anything but UTF-8 (windows-1251 in practice) is
//! transcoded to UTF-8 as it streams (`encoding_rs`).
//!
//! The writer ([`write`](mod@write)) is the inverse: [`element`] writes an element's JSON
//! back as XML by the same rule (what can't be XML, such as a key that is not an XML name, is
//! left out), and [`documents`] writes the `КоммерческаяИнформация` of `Документ`s that
//! answers 1C's `type=sale&mode=query`, in UTF-8 or windows-1251; what it writes reads back
//! alike.

pub mod package;
pub mod read;
pub mod write;

pub use read::{Reader, DEPTH_MAX, ELEMENT_BYTES_MAX};
pub use write::{documents, element, Written};

use serde_json::Value;

/// The change type of `Классификатор/Группы//Группа`.
pub const GROUP: &str = "CommerceML.Группа";
/// The change type of `Классификатор/Свойства/Свойство`.
pub const PROPERTY: &str = "CommerceML.Свойство";
/// The change type of `Каталог/Товары/Товар`.
pub const PRODUCT: &str = "CommerceML.Товар";
/// The change type of `ПакетПредложений/Предложения/Предложение`.
pub const OFFER: &str = "CommerceML.Предложение";
/// The change type of `Документ`.
pub const DOCUMENT: &str = "CommerceML.Документ";

/// The root element of every CommerceML file.
pub const ROOT: &str = "КоммерческаяИнформация";

/// One element of the table, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    /// [`GROUP`], [`PROPERTY`], [`PRODUCT`], [`OFFER`] or [`DOCUMENT`].
    pub kind: &'static str,
    /// Its `Ид`, without surrounding whitespace (`data` keeps it as written).
    pub reference: String,
    /// Marked deleted (see the module doc).
    pub deleted: bool,
    /// The element as JSON, an object.
    pub data: Value,
    /// The line its start tag begins on (1-based).
    pub line: u64,
}

/// What a file says about itself, for the caller. The root's attributes are known once the
/// first element (or error) came out; `СодержитТолькоИзменения` once its section started,
/// which is before the first `Товар` or `Предложение` of that section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The root's `ВерсияСхемы` (`2.07`).
    pub schema_version: Option<String>,
    /// The root's `ДатаФормирования` (`2020-04-07T13:16:06`).
    pub formed: Option<String>,
    /// `Каталог`'s `СодержитТолькоИзменения` (its attribute or child element): `false` is a
    /// full upload.
    pub catalog_only_changes: Option<bool>,
    /// `ПакетПредложений`'s `СодержитТолькоИзменения`.
    pub offers_only_changes: Option<bool>,
}

/// An element that could not be read, or a file that could not be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// This element is skipped; the reader goes on with the next.
    #[error(transparent)]
    Element(#[from] ElementError),
    /// The file can't be read on; nothing follows.
    #[error(transparent)]
    File(#[from] FileError),
}

impl ReadError {
    /// The line the error is on.
    pub fn line(&self) -> u64 {
        match self {
            ReadError::Element(e) => e.line,
            ReadError::File(e) => e.line,
        }
    }

    /// The same in Russian, short, for the 1C user (the text after `failure`).
    pub fn russian(&self) -> String {
        match self {
            ReadError::Element(e) => e.russian(),
            ReadError::File(e) => e.russian(),
        }
    }
}

/// One element that can't be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: <{name}> ({kind}) {problem}", name = element_name(.kind))]
pub struct ElementError {
    /// Which element of the table it is ([`PRODUCT`], …).
    pub kind: &'static str,
    /// The line its start tag begins on.
    pub line: u64,
    pub problem: ElementProblem,
}

impl ElementError {
    /// The same in Russian.
    pub fn russian(&self) -> String {
        let name = element_name(self.kind);
        let line = self.line;
        match &self.problem {
            ElementProblem::MissingId => {
                format!("строка {line}: элемент <{name}> без <Ид> пропущен")
            }
            ElementProblem::TooLarge { limit } => {
                format!("строка {line}: элемент <{name}> больше {limit} байт, пропущен")
            }
            ElementProblem::LongId { limit } => {
                format!(
                    "строка {line}: у элемента <{name}> <Ид> длиннее {limit} символов, пропущен"
                )
            }
        }
    }
}

/// What is wrong with one element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElementProblem {
    #[error("has no Ид (or an empty one): skipped, the others are read")]
    MissingId,
    #[error("is larger than {limit} bytes: skipped, the others are read")]
    TooLarge { limit: usize },
    #[error("has an Ид longer than {limit} characters: skipped, the others are read")]
    LongId { limit: usize },
}

/// A file that can't be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct FileError {
    /// The line the reader was on when it found the problem.
    pub line: u64,
    pub problem: FileProblem,
}

impl FileError {
    /// The same in Russian.
    pub fn russian(&self) -> String {
        let line = self.line;
        match &self.problem {
            FileProblem::Empty => {
                format!("файл пуст: нет элемента <{ROOT}>, это не файл CommerceML")
            }
            FileProblem::NotXml(detail) => {
                format!("строка {line}: файл не является XML ({detail})")
            }
            FileProblem::NotCommerceMl { root } => format!(
                "строка {line}: корневой элемент <{root}>, а не <{ROOT}>: это не файл CommerceML"
            ),
            FileProblem::Truncated { open, opened } => format!(
                "файл обрывается на строке {line} внутри <{open}> (строка {opened}): \
                 он загружен не полностью, выгрузите его ещё раз"
            ),
            FileProblem::UnknownEncoding(label) => {
                format!("неизвестная кодировка «{label}» в объявлении XML")
            }
            FileProblem::TooDeep { limit } => {
                format!("строка {line}: вложенность элементов глубже {limit}")
            }
            FileProblem::Io(detail) => format!("ошибка чтения файла на строке {line}: {detail}"),
        }
    }
}

/// Why a file can't be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("no root element: not a CommerceML file")]
    Empty,
    #[error("not XML: {0}")]
    NotXml(String),
    #[error("the root element is <{root}>, not <КоммерческаяИнформация>: not a CommerceML file")]
    NotCommerceMl { root: String },
    #[error("the file ends inside <{open}> (opened on line {opened}): truncated, upload it again")]
    Truncated { open: String, opened: u64 },
    #[error("unknown encoding {0:?} in the XML declaration")]
    UnknownEncoding(String),
    #[error("elements nested deeper than {limit}")]
    TooDeep { limit: usize },
    #[error("reading the file: {0}")]
    Io(String),
}

/// `Товар` for [`PRODUCT`]: the element's name in the file.
pub fn element_name(kind: &str) -> &str {
    kind.strip_prefix("CommerceML.").unwrap_or(kind)
}
