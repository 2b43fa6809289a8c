"""Fault tests on the app's side of tiermem: Milvus unavailable, the app process
killed mid-stream, hundreds of clients leaving mid-stream. Each test starts and
kills real processes on 127.0.0.1 and reports one line of figures
(``tests.fault_report.report_fault``).
"""
