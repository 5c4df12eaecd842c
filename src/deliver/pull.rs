//! Pull delivery (inbox): see issue 7.
