TOOL_NAME = "sd-webui-hypernetworks"
__version__ = "0.1.0"
