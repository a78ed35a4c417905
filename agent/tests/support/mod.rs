pub mod test_host;
